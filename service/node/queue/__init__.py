"""The work queue across machines, on Redis Streams (``queue.redis_url``): publishing journaled
instances (:mod:`~service.node.queue.stream`, light: receivers use it), refilling an emptied Redis
from the journal (:mod:`~service.node.queue.refill`) and the workers' consumer
(:mod:`~service.node.queue.consumer`). Off by default: without it the journal alone feeds the
workers. Import the modules, not this package (a receiver must not load the consumer's torch)."""
