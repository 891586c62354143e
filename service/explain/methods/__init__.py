"""The saliency methods, one module per method or small family (gradient, CAM, propagation,
occlusion, perturbation, surrogate, optimisation, real-time masker, class model)."""
