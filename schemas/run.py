"""The run configuration: one pydantic model tree, validated once at the edge (CLI / job entrypoint).

Names follow the SiDA paper (alpha, lambda_sid, lambda_adv_theta, lambda_adv_psi, sigma_init, t_max) and
SPEC.md's defaults (paper Tables 6 and 7). Every model forbids unknown keys.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator

from sida_core.methods import get_method, method_names

if TYPE_CHECKING:  # a Literal built at import time is not a static type; to a type checker a method is a str
    Method = str
else:
    Method = Literal[method_names()]  # the registered methods (sida_core/methods/): the registry is the only list
Precision = Literal["fp32", "fp16", "bf16"]


class Strict(BaseModel):
    """Config sections: unknown keys refused; floats finite (NaN or ±inf in alpha, a learning rate or total_kimg
    would pass every range check, as comparisons with NaN are false)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class NetworkConfig(Strict):
    """Denoiser architecture: ``arch`` plus backbone keyword arguments in EDM's names (e.g. SongUNet's
    model_channels). ``songunet`` = EDM's DDPM++ / NCSN++, ``adm`` = EDM's DhariwalUNet, ``edm2`` = EDM2's U-Net
    with its own preconditioning; ``precond`` chooses EDM's EDMPrecond / VPPrecond / VEPrecond for the others.
    A teacher imported from an EDM / EDM2 / SiD ``.pkl`` brings its own architecture (leave this out)."""

    arch: Literal["songunet", "adm", "edm2", "mlp"] = "songunet"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    precond: Literal["edm", "vp", "ve"] = "edm"
    precond_kwargs: dict[str, Any] = Field(default_factory=dict)


MAX_DIGITS_RESOLUTION = 64  # digits are upsampled in memory: 1,797 images at 64 px are 29 MB, at 1,024 px 7.5 GB


class DataConfig(Strict):
    """Real images: the built-in digits, or user data (image folder, EDM-style zip, .npz, IDX), or EDM2's SD-VAE
    latents (``latents``: an EDM2 ``dataset_tool encode`` zip; ``channels: 4``, ``resolution`` = latent size), or
    a dataset written by ``sida dataset prepare`` (``prepared``: ``path`` a local folder or ``s3://`` URI, staged
    once per node and read on demand; images or latents, as prepared)."""

    kind: Literal["digits", "folder", "zip", "npz", "idx", "latents", "prepared"] = "digits"
    path: Optional[str] = None
    resolution: PositiveInt = 8
    channels: Literal[1, 3, 4] = 1
    cond: bool = False
    num_classes: int = Field(0, ge=0)
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    xflip: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.kind != "digits" and not self.path:
            raise ValueError(f"data.path is required for data.kind={self.kind!r}")
        if self.kind == "digits" and (self.resolution % 8 or self.resolution > MAX_DIGITS_RESOLUTION):
            raise ValueError(f"data.resolution={self.resolution}: the built-in digits are 8x8, upsampled by a whole "
                             f"factor; use a multiple of 8 up to {MAX_DIGITS_RESOLUTION}")
        if self.kind != "prepared" and (self.channels == 4) != (self.kind == "latents"):
            raise ValueError(f"data.channels must be 4 exactly for data.kind 'latents' (SD-VAE latents) and 1 or 3 for "
                             f"images; got {self.channels} with data.kind {self.kind!r}")
        if self.cond and self.num_classes < 2:
            raise ValueError("data.num_classes must be >= 2 when data.cond is true")
        return self

    @property
    def label_dim(self) -> int:
        return self.num_classes if self.cond else 0


class TeacherTrainConfig(Strict):
    """How ``sida teacher train`` trains an EDM teacher (only for the built-in / small data)."""

    kimg: PositiveFloat = 500
    batch: PositiveInt = 128
    lr: PositiveFloat = 1e-3
    lr_rampup_kimg: float = Field(10, ge=0)
    ema_halflife_kimg: float = Field(50, ge=0)
    seed: int = 0


class TeacherConfig(Strict):
    """The frozen teacher f_phi: ``path`` names a checkpoint folder of this project's format, or a published file
    imported safely on first use (EDM / EDM2 / SiD ``.pkl``: architecture from the file; ``.pt`` / ``.pth`` /
    ``.safetensors`` state dict: architecture from ``network``); without ``path`` it is trained from ``train``."""

    path: Optional[str] = None
    key: Optional[str] = None  # which network in the file (EDM / EDM2 / SiD pickles: "ema" by default)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    p_mean: float = -1.2
    p_std: PositiveFloat = 1.2
    sampler_steps: PositiveInt = 18
    train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)


class LossConfig(Strict):
    """SiD / SiDA hyper-parameters (paper eqs. 6, 8, 9-10; Table 6).

    ``fake_score_logvar`` (SPEC "EDM2"; EDM2 eq. 21's loss): the psi loss per sample becomes
    gamma ||f_psi - x_g||^2 / e^u + u with u = u_psi(sigma) the fake-score net's logvar head (adversarial term
    unchanged). Needs an EDM2 fake-score net; off by default, as in the authors' EDM2 run scripts.
    """

    alpha: float = 1.0
    lambda_sid: PositiveFloat = 100.0
    lambda_adv_theta: float = Field(0.01, ge=0)
    lambda_adv_psi: float = Field(1.0, ge=0)
    sigma_init: PositiveFloat = 2.5
    t_max: float = Field(800, gt=0, le=1000)
    p_mean: float = -1.2
    p_std: PositiveFloat = 1.2
    fake_score_logvar: bool = False  # EDM2 logvar head in the psi loss (see the class docstring)


class AddOptions(Strict):
    """ADD's own options (``method: add``; docs/methods/add.md). The discriminator heads train with
    ``optimizer.lr_psi``; the distillation noise levels follow ``loss.t_max``; ``stages.fake_score_only_kimg`` is
    a discriminator-only warm-up (ADD has no SiD stage)."""

    lambda_adv: float = Field(1.0, ge=0)  # weight of the generator's adversarial term -sum_k mean D_k(x_g)
    lambda_distill: float = Field(2.5, ge=0)  # ADD's lambda on the distillation loss
    distill_weighting: Literal["exponential", "sds"] = "exponential"  # c(sigma): abar(sigma), or SDS's omega/(2 sigma)
    r1_gamma: float = Field(0.0, ge=0)  # R1 penalty on real data (0: off)
    feature_sigma: PositiveFloat = 0.002  # the noise level the frozen teacher encoder is told it sees (clean input)
    head_channels: PositiveInt = 64  # hidden channels of each discriminator head


class StagesConfig(Strict):
    """Stage boundaries in kimg (images seen, counted globally): fake-score only, then SiD, then SiDA."""

    fake_score_only_kimg: float = Field(100, ge=0)
    sid_until_kimg: float = Field(200, ge=0)

    @model_validator(mode="after")
    def _order(self):
        if self.sid_until_kimg < self.fake_score_only_kimg:
            raise ValueError(f"stages.sid_until_kimg ({self.sid_until_kimg}) must be >= stages.fake_score_only_kimg "
                             f"({self.fake_score_only_kimg})")
        return self


class OptimizerConfig(Strict):
    """Adam for psi and theta (paper: betas (0, 0.999), no weight decay, constant lr)."""

    lr_psi: PositiveFloat = 1e-5
    lr_theta: PositiveFloat = 1e-5
    beta1: float = Field(0.0, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: PositiveFloat = 1e-8
    grad_clip_value: Optional[PositiveFloat] = None  # default: 1.0 on psi when the adversarial term is on (SPEC)


class BatchConfig(Strict):
    """total = workers x per_worker x accumulation rounds; ``rounds`` is derived, never written."""

    total: PositiveInt = 256
    per_worker: PositiveInt = 32


def check_num_workers(v: Any) -> Any:
    """A worker count: a whole number >= 1, or ``[min, max]`` (Ray Train's elastic mode; equal ends are a number).
    Checked here, in one line each: pydantic would report the union's two branches separately."""
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or not all(map(whole, v)):
            raise ValueError(f"must be a whole number or [min, max] of two whole numbers, got {list(v)!r}")
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"[min, max] needs 1 <= min <= max, got {list(v)!r}")
        return v[0] if v[0] == v[1] else tuple(v)
    if not whole(v) or v < 1:
        raise ValueError(f"must be a whole number >= 1 or [min, max] (elastic), got {v!r}")
    return v


class ScalingConfig(Strict):
    """How many data-parallel workers (GPUs) share the batch; used by the Ray path.

    ``num_workers``: a number, or ``[min, max]`` for Ray Train's elastic mode: training starts with as many workers
    as the cluster holds (at least ``min``), goes on with the workers left when a node is lost, and grows back up to
    ``max`` when capacity returns (checked every ``elastic_resize_monitor_interval_s``). Each resize restarts the
    workers from the newest checkpoint; the total batch stays ``batch.total`` (the accumulation rounds follow the
    live worker count), so every worker count in the range must divide it."""

    num_workers: Union[PositiveInt, tuple[PositiveInt, PositiveInt]] = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    elastic_resize_monitor_interval_s: float = Field(60.0, ge=0)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        return check_num_workers(v)

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def describe(self) -> str:
        """``2`` or ``1-4`` (elastic): for log lines."""
        return f"{self.min_workers}-{self.max_workers}" if self.elastic else str(self.num_workers)


class EMAConfig(Strict):
    """Generator EMA: half-life of ``ema_mimg`` million images, ramped up as min(h, rampup * cur_nimg)."""

    ema_mimg: float = Field(0.5, ge=0)
    rampup: Optional[float] = Field(0.05, ge=0)


# every metric a scorer can report and its feature space: the schema's copy of sida_core.metrics.catalog.CATALOG
# (schemas import no torch; tests/test_metrics.py checks the two agree)
METRIC_SPACES: dict[str, str] = {
    "fd_digits": "fd_digits", "kid_digits": "fd_digits", "precision_digits": "fd_digits", "recall_digits": "fd_digits",
    "fid_inception": "fid_inception", "kid_inception": "fid_inception", "precision_inception": "fid_inception",
    "recall_inception": "fid_inception", "is_inception": "inception_probs", "fd_dinov2": "fd_dinov2"}
MetricName = Literal["fd_digits", "kid_digits", "precision_digits", "recall_digits", "fid_inception", "kid_inception",
                     "precision_inception", "recall_inception", "is_inception", "fd_dinov2"]


class MetricConfig(Strict):
    """How checkpoints are scored: FD-digits (built-in data) or Inception FID (clean-fid), by a pool of
    asynchronous scorer actors that never hold up training (``sida train``; see ray_jobs/scoring.py).

    Backlog policy: a free scorer always takes the NEWEST unscored checkpoint; when more than
    ``max_backlog`` checkpoints wait, the older ones are skipped and recorded (``scoring/skipped/``).
    The run's final checkpoint is always scored.
    """

    name: Literal["fd_digits", "fid_inception", "fd_dinov2"] = "fd_digits"  # the metric that ranks and pins
    # every metric computed from the same generated images, each its own leaderboard row (sida_core/metrics/
    # catalog.py): <statistic>_<feature space>, e.g. [fid_inception, kid_inception, precision_inception,
    # recall_inception, is_inception, fd_dinov2]; None: just `name`. `name` defaults to the first
    names: Optional[list[MetricName]] = None
    # clean-fid's resizing mode: "clean" (PIL bicubic to 299 outside the network) or "legacy_tensorflow" (the TF
    # Inception's own resize after uint8 quantisation: EDM's and the SiD papers' FID protocol); the reference
    # statistics must have been taken in the same one (recorded in their manifest and in every row)
    protocol: Literal["clean", "legacy_tensorflow"] = "clean"
    num_images: PositiveInt = 1000  # images generated per score (the paper: 50,000)
    reference: Optional[str] = None  # `sida fid-stats` folder URI or a .npz of mu/sigma; None: digits train split
    # reference folders of the other feature spaces in `names` ({fd_dinov2: URI}; fd_digits defaults to the digits
    # train split); KID / precision / recall need one written with `sida fid-stats --features`
    references: dict[Literal["fd_digits", "fid_inception", "fd_dinov2"], str] = Field(default_factory=dict)
    dinov2: Optional[str] = None  # fd_dinov2: dinov2_vitl14_pretrain.pth (local or s3://; never downloaded)
    seed: int = 0                    # generation seed of the live scores (`sida evaluate` uses others)
    enabled: bool = True             # score checkpoints while `sida train` runs
    num_scorers: PositiveInt = 1
    cpus_per_scorer: float = Field(1.0, ge=0)  # 0: only with a GPU share or scorer_resources that place it
    gpus_per_scorer: float = Field(0.0, ge=0)  # e.g. 0.25: four scorers share one GPU
    # custom Ray resources each scorer actor needs, e.g. {scoring: 1} to keep scorers on nodes started with
    # `ray start --resources '{"scoring": 4}'` (scoring nodes, or off the training nodes)
    scorer_resources: dict[str, PositiveFloat] = Field(default_factory=dict)
    max_backlog: PositiveInt = 2
    batch_size: PositiveInt = 500    # images per generator/extractor batch
    pin_best: bool = True            # copy the lowest-value checkpoint to pinned/ (outside keep-last-K)
    gallery: int = Field(64, ge=0, le=1024)  # a live score also writes gallery/CKPT.png: the one-step samples of
    #                                        seeds 0..gallery-1, the same for every checkpoint (0: none)
    drain_timeout_s: PositiveFloat = 1800  # after training: how long to wait for the last scores
    # latent-space runs (EDM2): the SD-VAE that decodes generated latents before the feature extractor; a diffusers
    # AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), local or s3://, never downloaded
    vae: Optional[str] = None
    vae_batch_size: PositiveInt = 8  # latents decoded at a time (the 512x512 decoder is memory-hungry)

    @model_validator(mode="before")
    @classmethod
    def _name_from_names(cls, data):
        if isinstance(data, dict) and data.get("names") and "name" not in data:
            return {**data, "name": data["names"][0]}
        return data

    @property
    def metric_names(self) -> list[str]:
        """Every metric scored, the ranking one (``name``) first."""
        return [self.name, *[n for n in (self.names or []) if n != self.name]]

    @model_validator(mode="after")
    def _check(self):
        if not (self.cpus_per_scorer or self.gpus_per_scorer or self.scorer_resources):
            raise ValueError("metric.cpus_per_scorer 0 needs gpus_per_scorer or scorer_resources: a scorer actor must "
                             "hold some resource, or Ray places any number of them anywhere")
        if {"CPU", "GPU"} & set(self.scorer_resources):
            raise ValueError("metric.scorer_resources: CPU and GPU are cpus_per_scorer / gpus_per_scorer")
        if self.names is not None:
            if len(set(self.names)) != len(self.names):
                raise ValueError(f"metric.names: {self.names} names a metric twice")
            if self.name not in self.names:
                raise ValueError(f"metric.name {self.name!r} must be one of metric.names {self.names} (it ranks them)")
        if self.name == "fd_digits" and self.protocol != "clean":
            raise ValueError(f"metric.protocol {self.protocol!r}: fd_digits is defined in 'clean' mode only "
                             "(legacy_tensorflow is an Inception FID protocol)")
        spaces = {METRIC_SPACES[n] for n in self.metric_names}
        if "fd_dinov2" in spaces and not self.dinov2:
            raise ValueError("metric.dinov2 is required for fd_dinov2: the path (local or s3://) of "
                             "dinov2_vitl14_pretrain.pth (never downloaded at run time)")
        if self.protocol != "clean" and not spaces & {"fid_inception", "inception_probs"}:
            raise ValueError(f"metric.protocol {self.protocol!r} applies to Inception metrics; "
                             f"{', '.join(self.metric_names)} are defined in 'clean' mode only")
        primary = METRIC_SPACES[self.name]
        for space in sorted(spaces - {primary, "inception_probs", "fd_digits"}):
            if self.enabled and space not in self.references:
                raise ValueError(f"metric.references.{space} is required: the reference statistics of the "
                                 f"{space} metrics in metric.names (metric.reference is {primary}'s)")
        if self.name in ("fid_inception", "fd_dinov2") and not self.reference and self.enabled:
            raise ValueError(f"metric.reference is required for metric.name {self.name!r} (reference statistics: "
                             "a `sida fid-stats` output URI or a .npz with mu and sigma)")
        return self


class StorageConfig(Strict):
    """Where runs write: a local folder (default) or ``s3://bucket/prefix`` on any S3-API store.

    Credentials: ``access_key_id`` / ``secret_access_key`` here, else the usual AWS environment variables
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION). Secrets are never written
    back to storage (the stored config shows them masked).
    """

    uri: str = "runs"
    endpoint_url: Optional[str] = None  # e.g. http://minio.internal:9000 (MinIO, Ceph RGW, R2); None = AWS
    region: Optional[str] = None
    access_key_id: Optional[SecretStr] = None
    secret_access_key: Optional[SecretStr] = None
    retry_attempts: PositiveInt = 6          # tries per storage operation before the run fails
    retry_max_backoff_s: PositiveFloat = 8.0  # exponential backoff between tries, capped here
    connect_timeout_s: PositiveFloat = 5.0
    request_timeout_s: PositiveFloat = 30.0   # a stalled request fails after this (plus ~6 s for uploads)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else ""
        if scheme not in ("", "file", "s3"):
            raise ValueError(f"must be a local folder, file://PATH or s3://BUCKET/PREFIX, got {v!r}")
        if scheme == "s3" and not v[5:].strip("/"):
            raise ValueError(f"s3:// URI needs a bucket name, got {v!r}")
        return v


class PerformanceConfig(Strict):
    """Speed options of the step (sida_core.performance; docs/performance.md). None changes the mathematics; the
    defaults are the plain eager step. ``compile: true`` means all three networks."""

    compile: list[Literal["generator", "fake_score", "teacher"]] = Field(default_factory=list)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: bool = False
    adam: Literal["default", "foreach", "fused"] = "default"
    single_psi_forward: bool = False
    tf32: Optional[bool] = None
    activation_checkpointing: bool = False

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v):
        if v is True:
            return ["generator", "fake_score", "teacher"]
        if v is False or v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("compile")
    @classmethod
    def _unique(cls, v: list) -> list:
        return list(dict.fromkeys(v))


class MlflowLogging(Strict):
    """Where ``logging.mlflow`` sends a run: ``file:./mlruns`` (offline), ``sqlite:///mlflow.db`` or ``http://host:5000``."""

    tracking_uri: str
    experiment: str = "sida"

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("tracking_uri is empty: give e.g. file:./mlruns, sqlite:///mlflow.db or http://host:5000")
        return v


class WandbLogging(Strict):
    """``logging.wandb``: Weights & Biases (``pip install wandb``; configured but not tested offline here)."""

    project: str
    entity: Optional[str] = None
    group: Optional[str] = None
    mode: Literal["online", "offline"] = "online"


class LoggingConfig(Strict):
    """Mirrors of a run's metric rows (losses, images/s, stage at their ``cur_nimg``) and leaderboard rows (each
    score at its checkpoint's ``cur_nimg``, not when it arrived) into the tools people watch (ray_jobs/tracking.py).
    Off by default; storage stays the record, the mirrors are rebuilt from it."""

    tensorboard: bool = False  # event files under RUN/tensorboard/ (tensorboard --logdir RUN_OR_ROOT)
    mlflow: Optional[MlflowLogging] = None
    wandb: Optional[WandbLogging] = None
    every_s: PositiveFloat = 10.0  # how often the driver copies new rows

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow is not None or self.wandb is not None


def check_name(v: str) -> str:
    """A run, sweep, pipeline or stage name: one folder name in storage."""
    if not v or v in (".", "..") or any(ch in v for ch in "/\\ \t\n"):
        raise ValueError("must be a non-empty name without slashes or spaces")
    return v


class RunConfig(Strict):
    """One distillation run."""

    name: str = "run"
    method: Method = "sida"
    init_generator: Optional[str] = None  # SiD²A: a SiD generator checkpoint (theta <- theta_sid)
    loss: LossConfig = Field(default_factory=LossConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    precision: Precision = "fp32"
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    add: AddOptions = Field(default_factory=AddOptions)  # used by method add only (Method.options)
    total_kimg: PositiveFloat = 1000
    seed: int = 0
    checkpoint_every_kimg: PositiveFloat = 50
    keep_checkpoints: PositiveInt = 5  # newest K kept in storage, plus pinned ones (e.g. the best FID)
    log_every_kimg: PositiveFloat = 5
    max_failures: int = Field(3, ge=0)  # Ray FailureConfig: worker-group restarts from the latest checkpoint
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    metric: MetricConfig = Field(default_factory=MetricConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @model_validator(mode="after")
    def _check(self):
        s, b = self.scaling, self.batch
        for workers in range(s.min_workers, s.max_workers + 1):  # elastic: every live worker count keeps batch.total
            if b.total % (b.per_worker * workers) == 0:
                continue
            if s.elastic:
                raise ValueError(f"batch.total ({b.total}) must be divisible by batch.per_worker x each worker count "
                                 f"in scaling.num_workers {list(s.num_workers)}: {b.per_worker} x {workers} = "
                                 f"{b.per_worker * workers} does not divide it")
            raise ValueError(f"batch.total ({b.total}) must be divisible by batch.per_worker x scaling.num_workers "
                             f"({b.per_worker} x {workers} = {b.per_worker * workers})")
        method = get_method(self.method)
        if method.starts_from_generator and not self.init_generator:
            raise ValueError(f"init_generator is required for method {method.name!r} ({method.display} starts from a "
                             f"SiD generator checkpoint)")
        if self.loss.fake_score_logvar and method.critic != "fake_score":
            users = ", ".join(n for n in method_names() if get_method(n).critic == "fake_score")
            raise ValueError(f"loss.fake_score_logvar applies to methods with a fake-score net ({users}), not "
                             f"{method.name!r}")
        if not method.starts_from_generator and self.init_generator:
            users = " / ".join(repr(n) for n in method_names() if get_method(n).starts_from_generator)
            raise ValueError(f"init_generator is only used by method {users}, not {self.method!r}")
        if self.teacher.path is None and self.data.kind != "digits":
            raise ValueError("teacher.path is required unless data.kind is 'digits' (the built-in teacher)")
        latent = self.data.channels == 4
        if latent and self.metric.enabled and not self.metric.vae:
            raise ValueError("metric.vae is required to score a latent-space run (data.channels 4): the SD-VAE decoder "
                             "folder (diffusers AutoencoderKL, e.g. stabilityai/sd-vae-ft-mse saved locally or in s3://), "
                             "or set metric.enabled: false")
        if self.metric.vae and not latent:
            raise ValueError(f"metric.vae is only used by latent-space runs (data.channels 4), not data.channels "
                             f"{self.data.channels}")
        if self.metric.reference is None and self.data.kind != "digits" and self.metric.enabled:
            raise ValueError("metric.reference is required unless data.kind is 'digits' (FD-digits' default reference "
                             "is the built-in digits' train split; make one with `sida fid-stats`)")
        return self

    @property
    def rounds(self) -> int:
        """Gradient-accumulation rounds per optimiser step on each worker (elastic: with the most workers)."""
        return self.rounds_with(self.scaling.max_workers)

    def rounds_with(self, workers: int) -> int:
        """The rounds on each of ``workers`` live workers: the total batch per step never changes."""
        return self.batch.total // (self.batch.per_worker * workers)

    @property
    def psi_grad_clip(self) -> Optional[float]:
        if self.optimizer.grad_clip_value is not None:
            return self.optimizer.grad_clip_value
        return 1.0 if get_method(self.method).adversarial_psi else None
