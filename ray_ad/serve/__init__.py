"""The fleet service: per-line detectors behind HTTP on Ray Serve.

``app`` builds the Serve application (``app_builder``, ``build_app``) from a ``ServiceConfig``
(``config``); its deployments are ``api.FleetAPI`` (HTTP ingress), ``scorer.LineScorer`` and
``watcher.Watcher`` (over ``jobs_api``, the Ray Jobs API client); ``metrics`` holds the ingress's
``LineMetrics``. The Ray-free pieces live beside them so that they are unit-tested without a cluster:
``config``, ``scoring`` (``score_images``, ``probe_detector``), ``requests`` (bodies -> images,
limits), ``auth`` (tokens) and ``landing`` (the landing zone).
"""
