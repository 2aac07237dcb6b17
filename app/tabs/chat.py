"""Steer & cap chat tab: widgets wired to app.chat_engine, app.plots and app.transcripts."""
from __future__ import annotations

import time

import gradio as gr

from app.chat_engine import (
    MODE_LABELS,
    TAU_SOURCE_LABELS,
    AxisChoice,
    ChatSettings,
    ChatSetupError,
    Conversation,
    SteerSettings,
    default_monitor_layer,
    load_axis_from_path,
    run_turn,
)
from app.context import AppContext
from app.jobs import HEAVY_CONCURRENCY_ID
from app.plots import drift_figure, projection_figure
from app.transcripts import build_transcript, save_transcript
from steering.axis_io import AxisFileError
from steering.interventions import POSITIONS

PLOT_EVERY_S = 0.4
QUANTILE_CHOICES = [0.01, 0.05, 0.25, 0.5, 0.75]


def _mode_choices() -> list[tuple[str, str]]:
    return [(label, key) for key, label in MODE_LABELS.items()]


def _tau_choices() -> list[tuple[str, str]]:
    return [(label, key) for key, label in TAU_SOURCE_LABELS.items()]


def _float_or_none(value) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return float(value)


def _monitor_layer(value, conversation: Conversation, n_layers: int | None) -> int | None:
    """The chosen layer, or (empty / negative) the middle of the last intervened band, or of the default band."""
    if value is not None and str(value).strip() != "" and int(value) >= 0:
        return min(int(value), n_layers - 1) if n_layers else int(value)
    for turn in reversed(conversation.turns):
        if turn.intervened_layers:
            layers = turn.intervened_layers
            return layers[len(layers) // 2]
    return default_monitor_layer(n_layers) if n_layers else None


def _turn_info(conversation: Conversation, layer: int | None) -> dict:
    if not conversation.turns:
        return {}
    turn = conversation.turns[-1]
    info = {"turn": len(conversation.turns), "intervention": turn.note or "none", "monitor_layer": layer,
            "tau": {str(k): round(v, 4) for k, v in turn.thresholds.items()}}
    for name, reply in (("steered", turn.steered), ("baseline", turn.baseline)):
        if reply is None:
            continue
        entry = {"tokens": len(reply.token_ids)}
        if layer is not None:
            entry["mean_projection"] = reply.mean_projection(layer)
            entry["projections"] = [round(v, 4) for v in reply.series(layer)]
        info[name] = entry
    return info


def build(ctx: AppContext, axis_state: gr.State) -> None:
    config = ctx.config
    conversation_state = gr.State(Conversation())

    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            with gr.Accordion("Model", open=False):
                model_id = gr.Textbox(value=config.model_id, label="Model id (Hub id, local folder or embedded default)")
                load_model_btn = gr.Button("Load model", size="sm")
                model_status = gr.Markdown(
                    "The model loads on first use (the embedded SmolLM2-135M-Instruct by default) and is shared "
                    "by all tabs.")
            with gr.Accordion("Axis", open=True):
                axis_path = gr.Textbox(value=config.default_run_dir(), label="Run directory or axis file path",
                                       info="a run's axis.safetensors, or any .safetensors/.pt axis file")
                axis_file = gr.File(label="...or upload an axis file", file_types=[".safetensors", ".pt"],
                                    type="filepath", height=130)
                load_axis_btn = gr.Button("Load axis", size="sm")
                axis_status = gr.Markdown("No axis loaded yet (the Hub tab can download one).",
                                          elem_id="axis-status")
            with gr.Accordion("Intervention", open=True):
                mode = gr.Radio(_mode_choices(), value="none", label="Intervention", elem_id="intervention-mode")
                layers = gr.Textbox(value="", label="Layers", visible=False,
                                    placeholder="empty = the default band (about 70-85% of the depth)",
                                    info="e.g. 20, 18-24 (inclusive), 18:25 (Python slice) or 18,20,22")
                coefficient = gr.Slider(-50, 50, value=8.0, step=0.5, label="c (add c x unit axis)", visible=False)
                tau_source = gr.Radio(_tau_choices(), value="axis", label="tau from", visible=False)
                quantile = gr.Dropdown(QUANTILE_CHOICES, value=0.25, allow_custom_value=True,
                                       label="percentile (0-1)", visible=False)
                tau_value = gr.Number(value=0.0, label="tau (when 'a number')", visible=False)
                experiment = gr.Dropdown([], value=None, allow_custom_value=True, visible=False,
                                         label="paper capping experiment (e.g. layers_46:54-p0.25)")
                positions = gr.Radio(list(POSITIONS), value="all", label="positions")
            with gr.Accordion("Generation", open=False):
                system_prompt = gr.Textbox(value="", label="System prompt", lines=2)
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
                max_tokens = gr.Slider(1, 1024, value=config.chat_max_new_tokens, step=1, label="max new tokens")
                seed = gr.Number(value=0, precision=0, label="seed")
                compare = gr.Checkbox(value=True, label="also answer unsteered (side by side)")
        with gr.Column(scale=2):
            with gr.Row():
                steered_chat = gr.Chatbot(label="Steered", height=360, elem_id="steered-chat")
                baseline_chat = gr.Chatbot(label="Unsteered", height=360, elem_id="baseline-chat")
            with gr.Row():
                message = gr.Textbox(placeholder="Message...", show_label=False, scale=5, elem_id="chat-input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                stop = gr.Button("Stop", scale=1)
                clear = gr.Button("Clear", scale=1)
            status = gr.Markdown("", elem_id="chat-status")
            projection_plot = gr.Plot(projection_figure(Conversation(), 0), label="Projection per token",
                                      elem_id="projection-plot")
            drift_plot = gr.Plot(drift_figure(Conversation(), 0), label="Persona drift")
            with gr.Accordion("Last turn details", open=False):
                turn_info = gr.JSON(label="last turn")
            with gr.Row(equal_height=False):
                monitor_layer = gr.Number(value=-1, precision=0, minimum=-1, scale=2,
                                          label="Monitored layer (-1 = middle of the intervened band)")
                with gr.Column(scale=2):
                    export_btn = gr.Button("Export transcript (JSON)", size="sm")
                    export_file = gr.File(label="transcript", interactive=False, height=80)

    # ------------------------------------------------------------------ callbacks

    def do_load_model(model_name: str):
        try:
            with ctx.heavy.held("loading the model"):
                ctx.models.get(model_name)
        except Exception as exc:  # shown to the user as is
            raise gr.Error(f"cannot load model: {exc}") from None
        return f"Loaded {ctx.models.info.describe()}"

    def do_load_axis(path: str, upload: str | None):
        try:
            return load_axis_from_path(upload or path)
        except AxisFileError as exc:
            raise gr.Error(str(exc)) from None

    def do_show_axis(choice: AxisChoice | None, quantile_v, experiment_v):
        if choice is None:
            return "No axis loaded yet (the Hub tab can download one).", gr.skip(), gr.skip()
        quantiles = choice.quantiles or QUANTILE_CHOICES
        experiments = sorted(choice.capping.experiments) if choice.capping else []
        note = ""
        info = ctx.models.info
        if info is not None:
            try:
                choice.check_fits(ctx.models.loaded)
            except AxisFileError as exc:
                note = f"\n\n**Does not fit the loaded model:** {exc}"
        keep_q = _float_or_none(quantile_v) in quantiles
        return (f"Loaded {choice.summary()}{note}",
                gr.update(choices=quantiles, value=quantile_v if keep_q else (0.25 if 0.25 in quantiles else quantiles[0])),
                gr.update(choices=experiments,
                          value=experiment_v if experiment_v in experiments else (experiments[0] if experiments else None)))

    def do_send(text, conversation: Conversation, axis: AxisChoice | None, model_name, mode_v, layers_v, coef_v,
                tau_source_v, quantile_v, tau_value_v, positions_v, experiment_v, system_v, temperature_v,
                max_tokens_v, seed_v, compare_v, monitor_v, path_v):
        conversation = conversation or Conversation()
        if not text or not text.strip():
            raise gr.Error("type a message first")
        try:
            settings = ChatSettings(
                system_prompt=system_v or "", max_new_tokens=int(max_tokens_v), temperature=float(temperature_v),
                seed=None if seed_v is None else int(seed_v), compare=bool(compare_v),
                steer=SteerSettings(mode=mode_v, layers=layers_v or "", coefficient=float(coef_v or 0.0),
                                    tau_source=tau_source_v, quantile=_float_or_none(quantile_v) or 0.0,
                                    tau_value=float(tau_value_v or 0.0), positions=positions_v,
                                    experiment=experiment_v or None))
        except (ChatSetupError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None
        if axis is None and mode_v != "none" and (path_v or "").strip():
            try:  # the axis path box is filled in: load it on first use
                axis = load_axis_from_path(path_v)
            except AxisFileError as exc:
                raise gr.Error(f"intervention '{mode_v}' needs an axis: {exc}") from None
        first = [True]

        def outputs(note: str, turn_layer: int | None, plots: bool):
            figs = (projection_figure(conversation, turn_layer), drift_figure(conversation, turn_layer)) \
                if plots and turn_layer is not None else (gr.skip(), gr.skip())
            info = _turn_info(conversation, turn_layer) if plots else gr.skip()
            axis_out = axis if first[0] else gr.skip()  # set once: later yields leave the state alone
            first[0] = False
            return (conversation.thread("steered"), conversation.thread("baseline"), *figs, note, conversation,
                    axis_out, info)

        yield outputs("", None, False)
        acquired = False
        events = None
        try:
            for line in ctx.heavy.wait_for("chat generation"):
                yield outputs(line, None, False)
            acquired = True
            if not ctx.models.is_loaded(model_name):
                yield outputs(f"loading {model_name} (first use)...", None, False)
            try:
                model = ctx.models.get(model_name)
            except Exception as exc:
                raise gr.Error(f"cannot load model {model_name!r}: {exc}") from None
            layer = _monitor_layer(monitor_v, conversation, model.n_layers) if axis is not None else None
            last_plot = 0.0
            events = run_turn(model, conversation, text, settings, axis)
            try:
                for event in events:
                    if event.side is None:
                        if axis is not None:
                            layer = _monitor_layer(monitor_v, conversation, model.n_layers)
                        label = f"done: {event.message or 'no intervention'}" if event.done else event.message
                        yield outputs(label, layer, True)
                        continue
                    now = time.monotonic()
                    plots = now - last_plot >= PLOT_EVERY_S
                    if plots:
                        last_plot = now
                    reply = event.turn.steered if event.side == "steered" else event.turn.baseline
                    side = "steered" if event.side == "steered" else "unsteered"
                    yield outputs(f"generating the {side} answer ({len(reply.token_ids)} tokens)", layer, plots)
            except ChatSetupError as exc:
                last = conversation.turns[-1] if conversation.turns else None
                if last is not None and last.user == text and not last.steered.token_ids and last.baseline is None:
                    conversation.turns.pop()  # nothing was generated for this turn
                raise gr.Error(str(exc)) from None
        finally:
            if events is not None:
                events.close()  # removes the generation hooks now, also when the user pressed Stop
            if acquired:
                ctx.heavy.release()

    def do_redraw(conversation: Conversation, monitor_v):
        n_layers = ctx.models.info.n_layers if ctx.models.info else None
        layer = _monitor_layer(monitor_v, conversation or Conversation(), n_layers)
        if layer is None:
            return gr.update(), gr.update(), gr.update()
        conversation = conversation or Conversation()
        return projection_figure(conversation, layer), drift_figure(conversation, layer), _turn_info(conversation, layer)

    def do_clear():
        empty = Conversation()
        return [], [], projection_figure(empty, 0), drift_figure(empty, 0), "", empty, {}, None

    def do_export(conversation: Conversation, axis: AxisChoice | None, monitor_v):
        conversation = conversation or Conversation()
        if not conversation.turns:
            raise gr.Error("nothing to export yet")
        info = ctx.models.info
        model = ctx.models.loaded
        data = build_transcript(
            conversation,
            model={"model_id": info.model_id, "n_layers": info.n_layers, "d_model": info.d_model,
                   "revision": info.revision} if info else {},
            axis=axis, monitor_layer=_monitor_layer(monitor_v, conversation, info.n_layers if info else None),
            tokenizer=model.tokenizer if model is not None else None)
        return str(save_transcript(config.transcripts_dir, data))

    def do_mode(mode_v, tau_source_v):
        cap = mode_v == "cap"
        return (gr.update(visible=mode_v == "add"), gr.update(visible=cap), gr.update(visible=cap),
                gr.update(visible=cap and tau_source_v == "value"), gr.update(visible=mode_v == "paper-cap"),
                gr.update(visible=mode_v != "none"))

    # ------------------------------------------------------------------ wiring

    mode_outputs = [coefficient, tau_source, quantile, tau_value, experiment, layers]
    mode.change(do_mode, [mode, tau_source], mode_outputs, api_name=False)
    tau_source.change(do_mode, [mode, tau_source], mode_outputs, api_name=False)

    load_model_btn.click(do_load_model, [model_id], [model_status], api_name="load_model",
                         concurrency_id=HEAVY_CONCURRENCY_ID, concurrency_limit=1)
    load_axis_btn.click(do_load_axis, [axis_path, axis_file], [axis_state], api_name="load_axis")
    axis_state.change(do_show_axis, [axis_state, quantile, experiment], [axis_status, quantile, experiment],
                      api_name=False)
    send_inputs = [message, conversation_state, axis_state, model_id, mode, layers, coefficient, tau_source,
                   quantile, tau_value, positions, experiment, system_prompt, temperature, max_tokens, seed,
                   compare, monitor_layer, axis_path]
    send_outputs = [steered_chat, baseline_chat, projection_plot, drift_plot, status, conversation_state,
                    axis_state, turn_info]
    send_event = send.click(do_send, send_inputs, send_outputs, api_name="chat",
                            concurrency_id=HEAVY_CONCURRENCY_ID, concurrency_limit=1)
    submit_event = message.submit(do_send, send_inputs, send_outputs, api_name=False,
                                  concurrency_id=HEAVY_CONCURRENCY_ID, concurrency_limit=1)
    for event in (send_event, submit_event):
        event.then(lambda: "", None, [message], api_name=False)
    stop.click(None, None, None, cancels=[send_event, submit_event], api_name=False)
    clear.click(do_clear, None, [steered_chat, baseline_chat, projection_plot, drift_plot, status,
                                 conversation_state, turn_info, export_file], api_name="clear_chat")
    monitor_layer.change(do_redraw, [conversation_state, monitor_layer], [projection_plot, drift_plot, turn_info],
                         api_name=False, trigger_mode="always_last")
    export_btn.click(do_export, [conversation_state, axis_state, monitor_layer], [export_file],
                     api_name="export_transcript")
