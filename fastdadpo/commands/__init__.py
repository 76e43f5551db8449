"""The verbs: ``train`` (with its config, metrics and precompute), ``generate``, ``eval`` (with its
judges), ``prune``, ``plan`` and ``run`` (a recipe). Each command module offers
``add_arguments(parser)`` and ``run(args)``; ``fastdadpo.cli`` imports the one asked for."""
