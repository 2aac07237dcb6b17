"""Steered chat, without any UI: which axis, which intervention, and one conversation turn as events.

A :class:`Conversation` holds two threads that share the user's messages: the *steered* thread
(answers generated with the intervention) and the *baseline* thread (answers of the unsteered
model, each continuing its own earlier answers). Every generated token carries its projection
on the axis at every layer (``steering.generation.Monitor``), so the monitored layer can be
changed after the fact and capping thresholds can be calibrated on what the unsteered model
does in this very conversation.

Turn order: the baseline answer first (needed when tau is calibrated on it), then the steered one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch

from pipeline.store import RunPaths
from steering.axis_io import AxisBundle, AxisFileError, load_axis
from steering.calibration import format_quantile, thresholds_from_projections
from steering.capping_config import CappingConfig
from steering.generation import GenerationSettings, Monitor, TokenStep, stream_generate
from steering.interventions import POSITIONS, InterventionPlan, add_axis, cap_on_axis
from steering.layers import LayerSpecError, default_capping_band, parse_layer_spec
from steering.models import LoadedModel

MODES = ("none", "add", "cap", "paper-cap")
MODE_LABELS = {
    "none": "none (monitor only)",
    "add": "add c x axis",
    "cap": "cap (floor tau on the projection)",
    "paper-cap": "cap with the paper's capping config",
}
TAU_SOURCES = ("axis", "calibrate", "value")
TAU_SOURCE_LABELS = {
    "axis": "percentile stored with the axis",
    "calibrate": "percentile of the unsteered answers in this chat",
    "value": "a number",
}
Side = Literal["baseline", "steered"]


class ChatSetupError(ValueError):
    """The chat settings cannot be turned into a generation (message says which setting)."""


# --------------------------------------------------------------------------- axis choice


@dataclass
class AxisChoice:
    """The axis the chat uses, where it came from, and an optional paper capping config."""

    bundle: AxisBundle
    source: str
    capping: CappingConfig | None = None

    @property
    def thresholds(self) -> list[str]:
        return sorted(self.bundle.metadata.thresholds)

    @property
    def quantiles(self) -> list[float]:
        return sorted(float(k[1:]) for k in self.bundle.metadata.thresholds if k.startswith("p"))

    def summary(self) -> str:
        meta = self.bundle.metadata
        parts = [f"axis [{self.bundle.n_layers} x {self.bundle.d_model}] from {self.source}"]
        if meta.model_id:
            parts.append(f"model {meta.model_id}")
        parts.append("thresholds " + (", ".join(self.thresholds) if self.thresholds else "none"))
        if self.capping is not None:
            parts.append(f"{len(self.capping.experiments)} capping experiments")
        return "; ".join(parts)

    def check_fits(self, model: LoadedModel) -> None:
        self.bundle.check_compatible(model.n_layers, model.d_model, model.model_id)


def load_axis_from_path(path: str | Path) -> AxisChoice:
    """An axis from a file (``.safetensors`` / ``.pt``) or a run directory (its ``axis.safetensors``)."""
    p = Path(str(path).strip()).expanduser()
    if not str(path).strip():
        raise AxisFileError("no axis path given")
    if p.is_dir():
        axis_file = RunPaths(p).axis
        if not axis_file.is_file():
            raise AxisFileError(f"{p}: the run has no axis yet ({axis_file.name} missing; run the axis step)")
        return AxisChoice(load_axis(axis_file), source=f"run {p}")
    return AxisChoice(load_axis(p), source=str(p))


# --------------------------------------------------------------------------- settings


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """:func:`steering.layers.parse_layer_spec`, with errors shown as chat setup errors."""
    try:
        return parse_layer_spec(text, n_layers)
    except LayerSpecError as exc:
        raise ChatSetupError(str(exc)) from exc


def default_monitor_layer(n_layers: int) -> int:
    layers = parse_layers(default_capping_band(n_layers), n_layers)
    return layers[len(layers) // 2]


@dataclass(frozen=True)
class SteerSettings:
    mode: str = "none"
    layers: str = ""  # parse_layers text; "" = the default band
    coefficient: float = 0.0  # add: c, in units of the unit axis
    tau_source: str = "axis"
    quantile: float = 0.25
    tau_value: float = 0.0
    positions: str = "all"
    experiment: str | None = None  # paper-cap: an experiment id of the capping config

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ChatSetupError(f"intervention {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.tau_source not in TAU_SOURCES:
            raise ChatSetupError(f"tau source {self.tau_source!r}: choose one of {', '.join(TAU_SOURCES)}")
        if self.positions not in POSITIONS:
            raise ChatSetupError(f"positions {self.positions!r}: choose one of {', '.join(POSITIONS)}")
        if not 0.0 <= float(self.quantile) <= 1.0:
            raise ChatSetupError(f"percentile {self.quantile}: must be within [0, 1]")


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str = ""
    max_new_tokens: int = 96
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    compare: bool = True  # also generate the unsteered answer
    steer: SteerSettings = field(default_factory=SteerSettings)

    def __post_init__(self) -> None:
        if int(self.max_new_tokens) < 1:
            raise ChatSetupError("max new tokens must be at least 1")
        if float(self.temperature) < 0:
            raise ChatSetupError("temperature must be >= 0 (0 = greedy)")
        if not 0 < float(self.top_p) <= 1:
            raise ChatSetupError("top-p must be within (0, 1]")

    def generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=int(self.max_new_tokens), temperature=float(self.temperature),
                                  top_p=float(self.top_p), seed=None if self.seed is None else int(self.seed))

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- conversation


@dataclass
class Reply:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    projections: list[dict[int, float]] = field(default_factory=list)  # one {layer: value} per token

    def add(self, step: TokenStep) -> None:
        self.text = step.text
        self.token_ids.append(step.token_id)
        self.projections.append(dict(step.projections))

    def series(self, layer: int) -> list[float]:
        return [p[layer] for p in self.projections if layer in p]

    def mean_projection(self, layer: int) -> float | None:
        values = self.series(layer)
        return sum(values) / len(values) if values else None


@dataclass
class Turn:
    user: str
    steered: Reply = field(default_factory=Reply)
    baseline: Reply | None = None
    settings: dict = field(default_factory=dict)
    thresholds: dict[int, float] = field(default_factory=dict)  # tau per capped layer
    intervened_layers: list[int] = field(default_factory=list)
    note: str = ""


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def thread(self, side: Side, upto: int | None = None) -> list[dict[str, str]]:
        """Messages of one thread (no system prompt), for the first ``upto`` turns."""
        messages: list[dict[str, str]] = []
        for turn in self.turns[:upto]:
            reply = turn.steered if side == "steered" or turn.baseline is None else turn.baseline
            messages.append({"role": "user", "content": turn.user})
            messages.append({"role": "assistant", "content": reply.text})
        return messages

    def calibration_projections(self) -> torch.Tensor | None:
        """``[N, L]`` projections of every unsteered token so far (``None`` when there are none)."""
        rows = [[p[layer] for layer in sorted(p)] for turn in self.turns if turn.baseline is not None
                for p in turn.baseline.projections if p]
        return torch.tensor(rows, dtype=torch.float32) if rows else None


@dataclass
class TurnEvent:
    side: Side | None  # None: a status message
    turn: Turn
    message: str = ""
    step: TokenStep | None = None
    done: bool = False


def resolve_intervention(axis: AxisChoice | None, steer: SteerSettings, n_layers: int,
                         calibration: torch.Tensor | None = None) -> tuple[InterventionPlan | None, dict[int, float], list[int], str]:
    """(plan, tau per capped layer, intervened layers, note) for ``steer`` on a model with ``n_layers``."""
    if steer.mode == "none":
        return None, {}, [], ""
    if axis is None:
        raise ChatSetupError(f"intervention '{steer.mode}' needs an axis: load one first")
    bundle = axis.bundle
    if steer.mode == "paper-cap":
        if axis.capping is None:
            raise ChatSetupError("this axis has no paper capping config (download one from the Hub tab)")
        if not steer.experiment:
            raise ChatSetupError("choose a capping experiment (e.g. layers_46:54-p0.25)")
        try:
            floors = axis.capping.as_axis_floors(steer.experiment)
        except KeyError as exc:
            raise ChatSetupError(str(exc).strip("'\"")) from None
        taus = {}
        for item in floors:
            cos = float(torch.nn.functional.cosine_similarity(item.vector.float(), bundle.axis[item.layer], dim=0)) \
                if item.layer < bundle.n_layers else 0.0
            if cos > 0.99:  # same direction as the axis: the floor is a tau on the axis projection
                taus[item.layer] = float(item.lo)
        plan = InterventionPlan(list(floors), positions=steer.positions)
        note = f"paper capping experiment {steer.experiment} on {len(floors)} layers"
        return plan, taus, sorted({f.layer for f in floors}), note
    layers = parse_layers(steer.layers or default_capping_band(n_layers), n_layers)
    if steer.mode == "add":
        plan = InterventionPlan(list(add_axis(bundle.axis, layers, float(steer.coefficient))), positions=steer.positions)
        return plan, {}, layers, f"add {float(steer.coefficient):+g} x unit axis at layers {_layer_text(layers)}"
    # cap
    if steer.tau_source == "value":
        thresholds = {layer: float(steer.tau_value) for layer in layers}
        note = f"tau = {float(steer.tau_value):g}"
    elif steer.tau_source == "axis":
        try:
            per_layer = bundle.threshold(float(steer.quantile))
        except AxisFileError as exc:
            raise ChatSetupError(f"{exc}; pick another percentile or calibrate on this chat") from None
        thresholds = {layer: float(per_layer[layer]) for layer in layers}
        note = f"tau = p{format_quantile(float(steer.quantile))} stored with the axis"
    else:
        if calibration is None or calibration.shape[0] == 0:
            raise ChatSetupError("calibration needs unsteered answers: none were generated yet")
        per_layer = thresholds_from_projections(calibration, float(steer.quantile))
        thresholds = {layer: float(per_layer[layer]) for layer in layers}
        note = (f"tau = p{format_quantile(float(steer.quantile))} of {calibration.shape[0]} unsteered tokens "
                "in this chat")
    plan = InterventionPlan(list(cap_on_axis(bundle.axis, thresholds, layers)), positions=steer.positions)
    return plan, thresholds, layers, f"cap at layers {_layer_text(layers)}, {note}"


def _layer_text(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def run_turn(model: LoadedModel, conversation: Conversation, user_text: str, settings: ChatSettings,
             axis: AxisChoice | None = None) -> Iterator[TurnEvent]:
    """Add a turn for ``user_text`` and generate it, yielding one event per token.

    The turn is appended to ``conversation`` first (so a partial turn is kept if the consumer
    stops); its replies fill in as tokens arrive.
    """
    if not user_text or not user_text.strip():
        raise ChatSetupError("the message is empty")
    if axis is not None:
        try:
            axis.check_fits(model)
        except AxisFileError as exc:
            raise ChatSetupError(str(exc)) from None
    steer = settings.steer
    needs_baseline = steer.mode != "none" and (settings.compare or
                                               (steer.mode == "cap" and steer.tau_source == "calibrate"))
    # Validate everything that does not need the baseline before generating anything.
    if steer.mode != "none" and not (steer.mode == "cap" and steer.tau_source == "calibrate"):
        resolve_intervention(axis, steer, model.n_layers)
    elif steer.mode == "cap":
        resolve_intervention(axis, SteerSettings(mode="cap", layers=steer.layers, tau_source="value"), model.n_layers)

    turn = Turn(user=user_text, settings=settings.as_dict())
    conversation.turns.append(turn)
    index = len(conversation.turns)
    monitor = Monitor(axis=axis.bundle.axis, layers=list(range(model.n_layers))) if axis is not None else None
    gen = settings.generation()

    def prompt(side: Side) -> list[int]:
        messages = model.chat.build_messages(settings.system_prompt or None, conversation.thread(side, upto=index))
        # conversation.thread includes this turn's (still empty) answer: drop it, keep the user message.
        return model.chat.encode(messages[:-1])

    if needs_baseline:
        turn.baseline = Reply()
        yield TurnEvent(None, turn, "generating the unsteered answer")
        for step in stream_generate(model, prompt("baseline"), None, gen, monitor):
            turn.baseline.add(step)
            yield TurnEvent("baseline", turn, step=step)

    plan, thresholds, layers, note = resolve_intervention(axis, steer, model.n_layers,
                                                          conversation.calibration_projections())
    turn.thresholds, turn.intervened_layers, turn.note = thresholds, layers, note
    yield TurnEvent(None, turn, note or "generating")
    for step in stream_generate(model, prompt("steered"), plan, gen, monitor):
        turn.steered.add(step)
        yield TurnEvent("steered", turn, step=step)
    yield TurnEvent(None, turn, note, done=True)
