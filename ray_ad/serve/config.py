"""What one fleet service is built from: ``ServiceConfig`` (and the scorer's ``ScorerOptions``).

``ServiceConfig.from_args`` reads the application args of a ``serve run`` / ``serve deploy`` config
(``serve_configs/*.yaml``), checks them, and fails at deploy time on what would fail on the first
request (an unknown key, no ``root``, a token file that does not load). Ray-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_ad import storage
from ray_ad.errors import ConfigError
from ray_ad.serve.auth import Tokens
from ray_ad.serve.requests import Limits

# The keys a serve config's ``args`` may hold (the scorer's options are set per deployment there).
APP_ARGS = {"root", "token_file", "poll_s", "max_pixels", "max_images", "max_request_pixels", "landing_interval_s",
            "default_source", "jobs_address", "skip_unreadable"}


@dataclass(frozen=True)
class ScorerOptions:
    """Overrides of the ``LineScorer`` deployment (``None``: the deployment's own, or the config's)."""

    cpus: float | None = None  # CPUs per replica (Ray caps its torch threads at that)
    max_ongoing: int | None = None  # max_ongoing_requests: caps a batch, summed over the lines it serves
    replicas: int | None = None

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.cpus:
            options["ray_actor_options"] = {"num_cpus": self.cpus}
        if self.max_ongoing:
            options["max_ongoing_requests"] = self.max_ongoing
        if self.replicas:
            options["num_replicas"] = self.replicas
        return options


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the ingress, the scorer and the landing watcher are built from."""

    root: str  # the storage root URI holding models/ (and landing/, jobs/)
    tokens: dict[str, Any] | None = None  # the token document itself (tests, benchmarks) ...
    token_file: str | None = None  # ... else this file, else the RAY_AD_TOKENS variable
    poll_s: float = 2.0  # how often the ingress re-reads a line's CURRENT
    limits: Limits = field(default_factory=Limits)  # per image, per request, per body
    landing_interval_s: float = 10.0  # landing-zone poll period; 0: only on POST /v1/landing/poll
    default_source: dict[str, str] | None = None  # landing line -> source line, when a marker names none
    jobs_address: str = "http://127.0.0.1:8265"  # the Ray Jobs API the watcher submits adaptations to
    skip_unreadable: bool = False  # landed images that do not decode are left out, not the whole batch
    scorer: ScorerOptions = field(default_factory=ScorerOptions)

    def load_tokens(self) -> Tokens:
        return Tokens.from_mapping(self.tokens, "tokens") if self.tokens else Tokens.load(self.token_file)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServiceConfig:
        """From a serve config's application ``args``: ``root`` (required), ``token_file`` (else
        ``RAY_AD_TOKENS``), ``poll_s``, ``max_pixels``, ``max_images``, ``max_request_pixels``,
        ``landing_interval_s``, ``default_source``, ``jobs_address``, ``skip_unreadable`` (landed images
        that do not decode are left out, named in the batch's manifest, instead of rejecting the batch).
        An unknown or missing key is an error naming it."""
        unknown = set(args) - APP_ARGS
        if unknown:
            raise ConfigError(f"unknown application args {sorted(unknown)}; allowed: {sorted(APP_ARGS)}")
        if not args.get("root"):
            raise ConfigError("application args need 'root': the storage root URI holding models/")
        # Local paths are relative to where `serve run` / `serve deploy` builds the app; replicas and the
        # jobs the watcher submits run elsewhere, so they get absolute ones.
        root = storage.absolute(args["root"])
        token_file = storage.absolute(args["token_file"]) if args.get("token_file") else None
        Tokens.load(token_file)  # fail at deploy time, not on the first request
        limits = Limits(max_pixels=int(args.get("max_pixels", Limits.max_pixels)),
                        max_images=int(args.get("max_images", Limits.max_images)),
                        max_request_pixels=int(args.get("max_request_pixels", Limits.max_request_pixels)))
        return cls(root=root, token_file=token_file, poll_s=float(args.get("poll_s", 2.0)),
                   limits=limits, landing_interval_s=float(args.get("landing_interval_s", 10.0)),
                   default_source=args.get("default_source"),
                   jobs_address=args.get("jobs_address", "http://127.0.0.1:8265"),
                   skip_unreadable=bool(args.get("skip_unreadable", False)))
