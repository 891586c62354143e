"""The saliency methods, one module per method or small family (gradient, CAM, propagation,
occlusion, perturbation, surrogate, optimisation, real-time masker, class model), and the
torch.fx graph interpreter the propagation methods walk (graph)."""
