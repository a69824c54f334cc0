"""How much to measure: the full run (about 20 minutes on 2 cores) and the quick smoke run.

All sizes live here so that the time budget can be read and changed in one place. Request
counts are per concurrency level; time limits stop a level that runs slower than planned (a
busy machine) without losing what it measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.triton_sweeps import Levels


@dataclass(frozen=True)
class Load:
    """One end-to-end workload: levels, requests per level (per worker, with a floor), time."""

    levels: tuple[int, ...]
    per_worker: int
    minimum: int
    max_seconds: float

    def requests(self, concurrency: int) -> int:
        return max(self.minimum, self.per_worker * concurrency)

    def total(self) -> int:
        return sum(self.requests(level) for level in self.levels)


@dataclass(frozen=True)
class EverythingCase:
    """Segment everything on one cold image, ours and upstream's generator, same settings."""

    name: str
    settings: dict[str, float] = field(default_factory=dict)  # form fields; {} = defaults
    timeout_s: float = 1800.0  # upstream's default 32x32 grid takes minutes on 2 cores

    @property
    def prompts(self) -> int:
        """Decoder prompts of the first crop layer (the only one unless crop_n_layers > 0)."""
        return int(self.settings.get("points_per_side", 32)) ** 2


# Filters loosened so that many masks survive random-init weights (as in tests/test_everything):
# the comparison then also covers filtering, NMS and encoding, not only the decoder.
MANY_MASKS = {
    "points_per_side": 8,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.4,
    "stability_score_offset": 0.05,
    "box_nms_thresh": 1.0,
}


@dataclass(frozen=True)
class Plan:
    name: str
    # Triton side
    sweep: Levels  # batching x instances variants
    runtime_sweep: Levels  # runtime / precision variants
    queue_delays_us: tuple[int, ...]  # decoder queue-delay sweep; empty: keep the committed one
    queue_delay_levels: tuple[int, ...]
    fourth_cell: bool  # no batching with 2 instances x 1 thread (beyond the tutorial's three)
    parity: bool
    parity_photos: int  # of the bundled photographs, in testkit.photos order
    runtime_e2e: Load | None  # cold requests through the proxy on each runtime variant
    # End to end
    compute_window: int  # encoder/decoder compute alone at concurrency 1 (perf windows)
    cold: Load
    baseline: Load
    cached: Load
    multi: Load
    everything: tuple[EverythingCase, ...]
    rounds: int = 1  # alternating trials of each batching and runtime level (A B, B A, ...)
    int8: bool = False  # quantize the encoder to int8 and time it against fp32
    warmup_requests: int = 2
    peak_at_end: bool = True  # a second peak measurement: the machine's load drifts
    notes: list[str] = field(default_factory=list)


# Sized for about 30 minutes on a 2-core AVX2 machine (an encoder call takes 1.5-2 s there):
# the levels that decide something (concurrency 1 for latency, 4 or 8 for throughput), two
# alternating rounds where a default is chosen, and upstream's default 32x32 grid once.
FULL = Plan(
    name="full",
    sweep=Levels(encoder=(1, 4), decoder=(1, 8), encoder_window=1, decoder_window=2),
    runtime_sweep=Levels(
        encoder=(1, 4), decoder=(1, 8), encoder_window=1, decoder_window=2, decoder_batch=(1,)
    ),
    queue_delays_us=(),
    queue_delay_levels=(),
    fourth_cell=False,
    parity=True,
    parity_photos=4,
    runtime_e2e=None,
    compute_window=2,
    cold=Load(levels=(1, 4), per_worker=3, minimum=6, max_seconds=45),
    baseline=Load(levels=(1, 4), per_worker=2, minimum=4, max_seconds=45),
    cached=Load(levels=(1, 4), per_worker=10, minimum=20, max_seconds=12),
    multi=Load(levels=(1, 4), per_worker=4, minimum=8, max_seconds=12),
    # One request at a time (each keeps both cores busy for minutes).
    everything=(EverythingCase("upstream defaults"),),
    rounds=2,
    int8=True,
)

QUICK = Plan(
    name="quick",
    sweep=Levels(encoder=(1,), decoder=(1, 8), encoder_window=1, decoder_window=3),
    runtime_sweep=Levels(
        encoder=(1,), decoder=(1,), encoder_window=1, decoder_window=3, decoder_batch=(1,)
    ),
    queue_delays_us=(),
    queue_delay_levels=(),
    fourth_cell=False,
    parity=True,
    parity_photos=2,
    runtime_e2e=None,
    compute_window=1,
    cold=Load(levels=(1, 4), per_worker=1, minimum=3, max_seconds=20),
    baseline=Load(levels=(1, 4), per_worker=1, minimum=2, max_seconds=20),
    cached=Load(levels=(1, 4), per_worker=8, minimum=10, max_seconds=3),
    multi=Load(levels=(1, 4), per_worker=3, minimum=4, max_seconds=3),
    everything=(EverythingCase("defaults, 4x4 grid", {"points_per_side": 4}),),  # smoke
    peak_at_end=False,
)

PLANS = {plan.name: plan for plan in (FULL, QUICK)}
