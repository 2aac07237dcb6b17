"""Persona dynamics tab: role vectors across training checkpoints on a fixed axis (pipeline.checkpoints) and a
conversation's drift along the axis, with a capped vs uncapped scripted comparison (pipeline.drift).

Widgets only: the values go through app.dynamics_steps to the library; model work runs on the shared model
under the app-wide heavy slot (the checkpoint run and the scripted comparison as background jobs)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.context import AppContext
from app.dynamics_steps import (
    CAPPING_JOB,
    CHECKPOINTS_JOB,
    SIDES,
    capping_function,
    checkpoint_figures,
    checkpoint_results,
    checkpoints_config,
    checkpoints_function,
    choose_axis,
    comparison_layers,
    comparison_views,
    display_table,
    drift_model_id,
    drift_views,
    latest_chat_export,
    parse_cap,
    pick_layer,
    read_script,
    read_transcript,
)
from app.jobs import HEAVY_CONCURRENCY_ID
from app.plots import empty_figure
from app.tabs.common import follow_job, job_status_markdown

CHECKPOINTS_HELP = """Replay the run's judged transcripts through each checkpoint, build its role vectors and
project them onto a **fixed** axis and onto the final checkpoint's persona PCs (`project-checkpoints`). A rerun
resumes: stored activations are not extracted again."""
CHECKPOINTS_PLACEHOLDER = """early=org/model@step-1000
/path/to/out@checkpoint-500
final=/path/to/final-model"""
DRIFT_HELP = """Project a conversation onto the axis per token and per assistant turn, or play a script of user
turns with and without capping (a floor `tau` on the projection)."""
SCRIPT_PLACEHOLDER = '["Who are you?", "Pretend you are a pirate now.", "Stay in character: who are you?"]'


def _layer_text(value) -> str | None:
    text = str(value or "").strip()
    return text or None


def build(ctx: AppContext, axis_state: gr.State | None = None) -> None:
    config = ctx.config
    chat_axis = axis_state if axis_state is not None else gr.State(None)

    with gr.Tabs():
        # ------------------------------------------------------------ checkpoints
        with gr.Tab("Checkpoints", id="dynamics-checkpoints"):
            gr.Markdown(CHECKPOINTS_HELP)
            with gr.Row():
                ck_run_dir = gr.Textbox(value=config.default_run_dir(), label="Run directory (responses + scores)",
                                        scale=3)
                ck_axis = gr.Textbox(label="Axis file (empty = the run's axis.safetensors)", scale=2)
            ck_list = gr.Textbox(lines=4, label="Checkpoints in training order, one per line",
                                 placeholder=CHECKPOINTS_PLACEHOLDER,
                                 info="a local directory, a Hub id, id@revision, dir@subdir or dir@git-revision; "
                                      "name=spec sets the display name")
            with gr.Row():
                ck_layers = gr.Textbox(label="Layers (empty = the middle layer)", placeholder="e.g. 20, 18-24, all")
                ck_min_score = gr.Slider(0, 3, value=3, step=1, label="min judge score of the responses used")
            with gr.Row():
                ck_run_btn = gr.Button("Run", variant="primary", size="sm")
                ck_load_btn = gr.Button("Load results", size="sm")
                ck_cancel_btn = gr.Button("Cancel", variant="stop", size="sm")
                ck_follow_btn = gr.Button("Follow running job", size="sm")
            ck_status = gr.Markdown("")
            ck_log = gr.Textbox(label="Log", lines=6, max_lines=6, autoscroll=True)
            ck_layer = gr.Dropdown([], value=None, allow_custom_value=True, label="Layer to plot")
            ck_summary = gr.Dataframe(interactive=False, wrap=True, max_height=300,
                                      label="Summary per checkpoint and layer")
            with gr.Row():
                ck_trajectory = gr.Plot(empty_figure("Role trajectories along the axis"), label="Along the axis")
                ck_pcs = gr.Plot(empty_figure("Persona space of the final checkpoint"), label="Persona PCs")
            ck_summary_plot = gr.Plot(empty_figure("Checkpoint summary"), label="Summary")

        # ------------------------------------------------------------ drift
        with gr.Tab("Conversation drift", id="dynamics-drift"):
            gr.Markdown(DRIFT_HELP)
            with gr.Row(equal_height=False):
                dr_axis = gr.Textbox(value=config.default_run_dir(), scale=3,
                                     label="Axis: run directory or axis file (empty = the chat tab's loaded axis)")
                dr_axis_file = gr.File(label="...or upload an axis file", file_types=[".safetensors", ".pt"],
                                       type="filepath", height=100, scale=2)
            with gr.Row():
                dr_model = gr.Textbox(value="", label="Model (empty = the axis file's model)",
                                      placeholder=f"the axis file's model, else {config.model_id}")
                dr_layers = gr.Textbox(label="Layers to project (empty = the middle layer)",
                                       placeholder="e.g. 20, 18-24, all")

            with gr.Accordion("Project a transcript", open=True):
                with gr.Row(equal_height=False):
                    tr_file = gr.File(label="Transcript (JSON)", file_types=[".json"], type="filepath", height=120)
                    tr_text = gr.Textbox(lines=5, max_lines=12, label="...or paste it (JSON)",
                                         placeholder='[{"role": "user", "content": "Hi"}, '
                                                     '{"role": "assistant", "content": "Hello!"}]',
                                         info='a list of {role, content} messages, {"messages": [...]} '
                                              "or the chat tab's export")
                    with gr.Column(min_width=200):
                        tr_side = gr.Radio(list(SIDES), value="steered", label="thread of a chat export")
                        tr_latest_btn = gr.Button("Use the latest chat export", size="sm")
                tr_btn = gr.Button("Project", variant="primary", size="sm")
                tr_status = gr.Markdown("")
                with gr.Row():
                    tr_token_plot = gr.Plot(empty_figure("Projection per token"), label="Per token")
                    tr_turn_plot = gr.Plot(empty_figure("Mean projection per turn"), label="Per turn")
                tr_table = gr.Dataframe(interactive=False, wrap=True, max_height=300, label="Per assistant turn")

            with gr.Accordion("Scripted conversation: capped vs uncapped", open=True):
                with gr.Row(equal_height=False):
                    sc_file = gr.File(label="Script (JSON list of user turns)", file_types=[".json"],
                                      type="filepath", height=120)
                    sc_text = gr.Textbox(lines=5, max_lines=12, label="...or write it",
                                         placeholder=SCRIPT_PLACEHOLDER,
                                         info='a JSON list of user turns, {"system_prompt", "turns"}, '
                                              "or one user turn per line")
                with gr.Row():
                    sc_system = gr.Textbox(label="System prompt (empty = the script's)")
                    sc_cap = gr.Textbox(value="p0.25", label="Cap threshold tau",
                                        info="pXX = the axis file's percentile threshold (e.g. p0.25), or a number")
                    sc_cap_layers = gr.Textbox(label="Cap layers (empty = the layers above)",
                                               placeholder="e.g. 18-24")
                    sc_max_tokens = gr.Number(value=64, precision=0, minimum=1, label="max new tokens per reply")
                with gr.Row():
                    sc_btn = gr.Button("Run with and without capping", variant="primary", size="sm")
                    sc_cancel_btn = gr.Button("Cancel", variant="stop", size="sm")
                    sc_follow_btn = gr.Button("Follow running job", size="sm")
                sc_status = gr.Markdown("")
                sc_log = gr.Textbox(label="Log", lines=5, max_lines=5, autoscroll=True)
                sc_layer = gr.Dropdown([], value=None, allow_custom_value=True, label="Layer to plot")
                with gr.Row():
                    sc_token_plot = gr.Plot(empty_figure("Capped vs uncapped, per token"), label="Per token")
                    sc_turn_plot = gr.Plot(empty_figure("Capped vs uncapped, per turn"), label="Per turn")
                sc_table = gr.Dataframe(interactive=False, wrap=True, max_height=300,
                                        label="Mean projection per turn and layer")
                sc_state = gr.State(None)

    # ------------------------------------------------------------------ shared callbacks

    def find_job(name: str):
        for job in reversed(ctx.jobs.jobs):
            if job.name == name:
                return job
        return None

    def cancel(name: str) -> str:
        job = ctx.jobs.active()
        if job is None:
            return "No job is running."
        if job.name != name:
            return f"The running job is '{job.name}', not {name}: cancel it where it was started."
        return job_status_markdown(ctx.jobs.cancel(job.id))

    def submit(name: str, fn):
        try:
            return ctx.jobs.submit(name, fn, heavy=True)
        except Exception as exc:  # Busy: another job runs
            raise gr.Error(str(exc)) from None

    # ------------------------------------------------------------------ checkpoints callbacks

    def ck_results(run_dir_v, layer_v, note: str = ""):
        view = checkpoint_results(run_dir_v)
        layer = pick_layer(view.layers, layer_v)
        status = (f"{note}Results of {len(view.checkpoints)} checkpoints ({', '.join(view.checkpoints)}) "
                  f"at layers {view.layers}")
        return (status, gr.update(choices=view.layers, value=layer), display_table(view.summary),
                *checkpoint_figures(view, layer))

    def ck_render(job):
        return (job_status_markdown(job), job.log_tail(), *[gr.skip()] * 5)

    def ck_finish(job, run_dir_v, layer_v):
        result = job.result or {}
        if job.status != "done" or result.get("stopped"):
            return ck_render(job)
        done = "; ".join(f"{c['name']}: {c['extracted']} extracted, {c['stored_before']} stored before"
                         for c in result.get("checkpoints", []))
        try:
            status, *views = ck_results(result.get("output_dir") or run_dir_v, layer_v)
        except (FileNotFoundError, ValueError) as exc:
            return (f"{job_status_markdown(job)}\n\n{exc}", job.log_tail(), *[gr.skip()] * 5)
        return (f"{job_status_markdown(job)} ({done})\n\n{status}", job.log_tail(), *views)

    def ck_run(run_dir_v, list_v, axis_v, layers_v, min_score_v, layer_v, progress=gr.Progress()):
        try:
            settings = checkpoints_config(run_dir_v, list_v, axis_v, layers_v, min_score_v, ctx.models)
        except (ValueError, TypeError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        job = submit(CHECKPOINTS_JOB, checkpoints_function(settings, ctx.models))
        yield from follow_job(job, progress, ck_render)
        yield ck_finish(job, run_dir_v, layer_v)

    def ck_follow(run_dir_v, layer_v, progress=gr.Progress()):
        job = find_job(CHECKPOINTS_JOB)
        if job is None:
            yield ("No checkpoint run in this app yet.", "", *[gr.skip()] * 5)
            return
        yield from follow_job(job, progress, ck_render)
        yield ck_finish(job, run_dir_v, layer_v)

    def ck_load(run_dir_v, layer_v):
        try:
            status, *views = ck_results(run_dir_v, layer_v)
        except (FileNotFoundError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        return (status, *views)

    def ck_redraw(run_dir_v, layer_v):
        try:
            view = checkpoint_results(run_dir_v)
        except (FileNotFoundError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        return checkpoint_figures(view, pick_layer(view.layers, layer_v))

    # ------------------------------------------------------------------ drift callbacks

    def dr_setup(axis_v, axis_upload, chat_axis_v, model_v):
        bundle, source = choose_axis(axis_v, axis_upload, chat_axis_v)
        return bundle, source, drift_model_id(model_v, bundle, config.model_id)

    def tr_project(upload, text, side, axis_v, axis_upload, chat_axis_v, model_v, layers_v):
        from pipeline.drift import project_transcript

        try:
            messages = read_transcript(upload, text, side)
            bundle, source, model_id = dr_setup(axis_v, axis_upload, chat_axis_v, model_v)
        except (ValueError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        skip = [gr.skip()] * 3
        acquired = False
        try:
            for line in ctx.heavy.wait_for("drift projection"):
                yield (line, *skip)
            acquired = True
            if not ctx.models.is_loaded(model_id):
                yield (f"loading {model_id} (first use)...", *skip)
            model = ctx.models.get(model_id)
            result = project_transcript(model, messages, bundle, _layer_text(layers_v),
                                        label=Path(upload).stem if upload else "transcript")
        except Exception as exc:  # model, axis or layer problems, shown as they are
            raise gr.Error(str(exc)) from None
        finally:
            if acquired:
                ctx.heavy.release()
        turns = int(result.turns["turn"].nunique()) if not result.turns.empty else 0
        status = (f"{turns} assistant turns, {len(result.tokens) // max(len(result.layers), 1)} tokens, "
                  f"layers {result.layers}; model {model_id}, axis {source}")
        yield (status, *drift_views(result))

    def tr_latest():
        path = latest_chat_export(config.transcripts_dir)
        if path is None:
            raise gr.Error("no chat export yet: use 'Export transcript' in the chat tab first")
        return str(path)

    def sc_render(job):
        return (job_status_markdown(job), job.log_tail(), *[gr.skip()] * 5)

    def sc_finish(job, layer_v):
        result = job.result or {}
        comparison = result.get("comparison")
        if job.status != "done" or comparison is None:
            return sc_render(job)
        layers = comparison_layers(comparison)
        layer = pick_layer(layers, layer_v)
        saved = result.get("files", {}).get("json")
        status = job_status_markdown(job) + (f"\n\nSaved to `{saved}`" if saved else "")
        return (status, job.log_tail(), gr.update(choices=layers, value=layer),
                *comparison_views(comparison, layer), comparison)

    def sc_run(upload, text, system_v, axis_v, axis_upload, chat_axis_v, model_v, layers_v, cap_v, cap_layers_v,
               max_tokens_v, layer_v, progress=gr.Progress()):
        from pipeline.drift import resolve_thresholds

        try:
            system, turns = read_script(upload, text)
            bundle, _, model_id = dr_setup(axis_v, axis_upload, chat_axis_v, model_v)
            cap = parse_cap(cap_v)
            resolve_thresholds(bundle, cap)  # a missing percentile fails now, not in the job
            fn = capping_function(ctx.models, model_id, bundle, turns, cap, _layer_text(layers_v),
                                  _layer_text(cap_layers_v), system_prompt=(system_v or "").strip() or system,
                                  max_new_tokens=int(max_tokens_v or 64), out_dir=config.workspace / "drift")
        except (ValueError, TypeError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        job = submit(CAPPING_JOB, fn)
        yield from follow_job(job, progress, sc_render)
        yield sc_finish(job, layer_v)

    def sc_follow(layer_v, progress=gr.Progress()):
        job = find_job(CAPPING_JOB)
        if job is None:
            yield ("No scripted comparison in this app yet.", "", *[gr.skip()] * 5)
            return
        yield from follow_job(job, progress, sc_render)
        yield sc_finish(job, layer_v)

    def sc_redraw(comparison, layer_v):
        if comparison is None:
            return gr.skip(), gr.skip()
        token_fig, turn_fig, _ = comparison_views(comparison, layer_v)
        return token_fig, turn_fig

    # ------------------------------------------------------------------ wiring

    ck_inputs = [ck_run_dir, ck_list, ck_axis, ck_layers, ck_min_score, ck_layer]
    ck_views = [ck_layer, ck_summary, ck_trajectory, ck_pcs, ck_summary_plot]
    # The run and follow handlers only watch a background job: no concurrency limit.
    ck_run_btn.click(ck_run, ck_inputs, [ck_status, ck_log, *ck_views], api_name="checkpoints_run",
                     concurrency_limit=None)
    ck_follow_btn.click(ck_follow, [ck_run_dir, ck_layer], [ck_status, ck_log, *ck_views],
                        api_name="checkpoints_follow", concurrency_limit=None)
    ck_cancel_btn.click(lambda: cancel(CHECKPOINTS_JOB), None, [ck_status], api_name="checkpoints_cancel")
    ck_load_btn.click(ck_load, [ck_run_dir, ck_layer], [ck_status, *ck_views], api_name="checkpoints_results")
    ck_layer.input(ck_redraw, [ck_run_dir, ck_layer], [ck_trajectory, ck_pcs, ck_summary_plot], api_name=False)

    dr_common = [dr_axis, dr_axis_file, chat_axis, dr_model, dr_layers]
    tr_btn.click(tr_project, [tr_file, tr_text, tr_side, *dr_common], [tr_status, tr_token_plot, tr_turn_plot, tr_table],
                 api_name="drift_project", concurrency_id=HEAVY_CONCURRENCY_ID, concurrency_limit=1)
    tr_latest_btn.click(tr_latest, None, [tr_file], api_name="drift_latest_chat_export")

    sc_views = [sc_layer, sc_token_plot, sc_turn_plot, sc_table, sc_state]
    sc_btn.click(sc_run, [sc_file, sc_text, sc_system, *dr_common, sc_cap, sc_cap_layers, sc_max_tokens, sc_layer],
                 [sc_status, sc_log, *sc_views], api_name="drift_compare", concurrency_limit=None)
    sc_follow_btn.click(sc_follow, [sc_layer], [sc_status, sc_log, *sc_views], api_name="drift_compare_follow",
                        concurrency_limit=None)
    sc_cancel_btn.click(lambda: cancel(CAPPING_JOB), None, [sc_status], api_name="drift_compare_cancel")
    sc_layer.input(sc_redraw, [sc_state, sc_layer], [sc_token_plot, sc_turn_plot], api_name=False)
