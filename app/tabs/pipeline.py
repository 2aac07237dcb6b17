"""Pipeline tab: run the steps (rollouts -> generate -> extract -> judge -> vectors -> axis) as background
jobs with live progress, log tail and cancel; browse the results of a run."""
from __future__ import annotations

import re

import gradio as gr

from app import roles_data
from app.context import AppContext
from app.pipeline_steps import (
    ALL,
    STEPS,
    PipelineSettings,
    check_settings,
    filter_responses,
    run_overview,
    run_vectors_view,
    score_lists,
    scored_responses,
    step_function,
)
from app.plots import empty_figure, layer_summary_figure, pca_figure, score_histogram
from app.tabs.common import as_json, follow_job, job_status_markdown
from pipeline.llm import DEFAULT_MODELS, PROVIDERS


def _overview_markdown(info: dict) -> str:
    if not info.get("exists"):
        return f"`{info['run_dir']}` does not exist yet: the rollouts step creates it."
    steps = info.get("steps", {})
    rows = [
        ("rollouts", info.get("rollouts", 0)), ("generate", f"{info.get('responses', 0)} responses"),
        ("extract", f"{info.get('activations', 0)} activations"), ("judge", f"{info.get('scores', 0)} scores"),
        ("vectors", "vectors.safetensors" if info.get("vectors") else "-"),
        ("axis", "axis.safetensors" if info.get("axis") else "-"),
    ]
    lines = [f"Run `{info['run_dir']}`" + (f", model `{info['model']}`" if info.get("model") else ""), "",
             "| step | output | state |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {steps.get(name, 'not run')} |" for name, value in rows]
    return "\n".join(lines)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in re.split(r"[\s,]+", (text or "").strip()) if x)
    except ValueError:
        raise gr.Error(f"quantiles {text!r}: write numbers between 0 and 1, e.g. 0.01, 0.25, 0.5") from None


def _int_or_none(value) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = int(value)
    return value if value > 0 else None


def build(ctx: AppContext):
    """Create the tab; returns ``on_load(demo)``, which refreshes the run and job status on page load."""
    config = ctx.config
    sets = roles_data.role_sets(config.workspace)

    with gr.Row():
        run_dir = gr.Textbox(value=config.default_run_dir(), label="Run directory", scale=4, elem_id="run-dir")
        refresh = gr.Button("Refresh", scale=1)
    overview = gr.Markdown(_overview_markdown(run_overview(config.default_run_dir())))

    with gr.Accordion("Settings", open=True):
        with gr.Row():
            model_id = gr.Textbox(value=config.model_id, label="Model id", scale=2)
            role_set = gr.Dropdown(list(sets), value=roles_data.SHIPPED, label="Role set", scale=1)
            roles = gr.Dropdown(roles_data.role_set_names(sets[roles_data.SHIPPED]), multiselect=True,
                                value=[], label="Roles (empty = all of the set)", scale=3)
        with gr.Row():
            question_count = gr.Number(value=3, precision=0, label="questions (0 = all 240)")
            prompt_count = gr.Number(value=0, precision=0, label="system prompts per role (0 = all)")
            rollouts_per_prompt = gr.Number(value=1, precision=0, label="samples per prompt")
            batch_size = gr.Number(value=8, precision=0, label="batch size")
            max_new_tokens = gr.Number(value=64, precision=0, label="max new tokens")
            temperature = gr.Number(value=0.7, label="temperature")
            seed = gr.Number(value=0, precision=0, label="seed")
        with gr.Row():
            judge_provider = gr.Dropdown(list(PROVIDERS), value="openai", label="Judge provider")
            judge_model = gr.Textbox(value=DEFAULT_MODELS["openai"], label="Judge model")
            judge_base_url = gr.Textbox(label="Judge base URL (optional)")
            judge_key = gr.Textbox(label="Judge API key (or env var)", type="password")
            judge_limit = gr.Number(value=0, precision=0, label="judge at most (0 = all)")
        with gr.Row():
            min_score = gr.Slider(0, 3, value=3, step=1, label="vectors: min judge score")
            min_count = gr.Number(value=1, precision=0, label="vectors: min responses per role")
            quantiles = gr.Textbox(value="0.01, 0.05, 0.25, 0.5, 0.75", label="axis: threshold quantiles")

    with gr.Row():
        step_buttons = {step: gr.Button(step.capitalize(), size="sm") for step in STEPS}
        all_btn = gr.Button("All steps", variant="primary", size="sm")
        cancel_btn = gr.Button("Cancel", variant="stop", size="sm")
        follow_btn = gr.Button("Follow running job", size="sm")
    job_status = gr.Markdown(job_status_markdown(ctx.jobs.latest()), elem_id="job-status")
    with gr.Row(equal_height=False):
        log_tail = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, scale=3)
        step_report = gr.JSON(label="Report", scale=2)

    with gr.Accordion("Results", open=False):
        with gr.Row():
            result_role = gr.Dropdown([], value=None, allow_custom_value=True, label="Role filter")
            result_text = gr.Textbox(label="Text filter")
            results_btn = gr.Button("Load results")
        responses = gr.Dataframe(interactive=False, wrap=True, max_height=360, label="Responses and judge scores")
        histogram = gr.Plot(empty_figure("Judge scores per role"), label="Scores")
        with gr.Row():
            layer = gr.Slider(0, 63, value=0, step=1, label="PCA layer")
        with gr.Row():
            pca_plot = gr.Plot(empty_figure("Role vectors (PCA)"), label="PCA")
            summary_plot = gr.Plot(empty_figure("Per layer"), label="Per layer")

    # ------------------------------------------------------------------ callbacks

    def settings_from(run_dir_v, model_v, set_v, roles_v, qc, pc, rpp, bs, mnt, temp, seed_v, jp, jm, jurl, jkey,
                      jlimit, mscore, mcount, quant) -> PipelineSettings:
        folder = roles_data.role_sets(config.workspace).get(set_v or roles_data.SHIPPED)
        try:
            return PipelineSettings(
                run_dir=(run_dir_v or "").strip(), model_id=(model_v or "").strip(), device=config.device,
                dtype=config.dtype, roles_dir=str(folder) if folder and set_v != roles_data.SHIPPED else None,
                roles=tuple(roles_v) if roles_v else None, question_count=_int_or_none(qc),
                prompt_count=_int_or_none(pc), rollouts_per_prompt=int(rpp or 1), batch_size=int(bs or 8),
                max_new_tokens=int(mnt or 64), temperature=float(temp or 0.0), seed=int(seed_v or 0),
                judge_provider=jp, judge_model=(jm or "").strip() or DEFAULT_MODELS.get(jp, ""),
                judge_base_url=(jurl or "").strip() or None, judge_api_key=(jkey or "").strip() or None,
                judge_limit=_int_or_none(jlimit), min_score=int(mscore), min_count=int(mcount or 1),
                quantiles=_float_list(quant))
        except (ValueError, TypeError) as exc:
            raise gr.Error(str(exc)) from None

    def render(job):
        return job_status_markdown(job), job.log_tail(), gr.skip(), gr.skip()

    def finish(job, run_dir_v):
        report = job.result if job.result is not None else {"error": job.error}
        return job_status_markdown(job), job.log_tail(), as_json(report), \
            _overview_markdown(run_overview(run_dir_v))

    def start(step: str):
        # Explicit parameters: Gradio finds gr.Progress by its position in the signature.
        def handler(run_dir_v, model_v, set_v, roles_v, qc, pc, rpp, bs, mnt, temp, seed_v, jp, jm, jurl, jkey,
                    jlimit, mscore, mcount, quant, progress=gr.Progress()):
            settings = settings_from(run_dir_v, model_v, set_v, roles_v, qc, pc, rpp, bs, mnt, temp, seed_v, jp,
                                     jm, jurl, jkey, jlimit, mscore, mcount, quant)
            try:
                check_settings(step, settings)
                fn = step_function(step, settings, ctx.models, ctx.heavy)
                job = ctx.jobs.submit(step if step != ALL else "all steps", fn)
            except Exception as exc:
                raise gr.Error(str(exc)) from None
            yield from follow_job(job, progress, render)
            yield finish(job, settings.run_dir)
        handler.__name__ = f"run_{step}"
        return handler

    def do_follow(run_dir_v, progress=gr.Progress()):
        job = ctx.jobs.active() or ctx.jobs.latest()
        if job is None:
            yield "No job has run in this app yet.", "", gr.skip(), gr.skip()
            return
        yield from follow_job(job, progress, render)
        yield finish(job, run_dir_v)

    def do_cancel():
        return job_status_markdown(ctx.jobs.cancel())

    def do_refresh(run_dir_v):
        return _overview_markdown(run_overview(run_dir_v))

    def do_role_set(set_v):
        folder = roles_data.role_sets(config.workspace).get(set_v)
        names = roles_data.role_set_names(folder) if folder else []
        return gr.update(choices=names, value=[])

    def do_results(run_dir_v, role_v, text_v, layer_v):
        everything = scored_responses(run_dir_v)
        table = filter_responses(everything, role=role_v or None, text=text_v or None)
        roles_list, scores = score_lists(everything)
        role_choices = sorted(set(everything["role"]))
        try:
            view = run_vectors_view(run_dir_v)
        except (FileNotFoundError, ValueError) as exc:
            return (table, score_histogram(roles_list, scores), empty_figure("Role vectors (PCA)", str(exc)),
                    empty_figure("Per layer", "run the axis step first"), gr.update(choices=role_choices),
                    gr.skip())
        n_layers = view.axis.shape[0]
        index = min(max(int(layer_v or 0), 0), n_layers - 1)
        pca_fig, _ = pca_figure(view.names, view.role_vectors[:, index], view.axis[index], index,
                                view.default[index] if view.default is not None else None)
        return (table, score_histogram(roles_list, scores), pca_fig, layer_summary_figure(view.layer_summary),
                gr.update(choices=role_choices), gr.update(maximum=n_layers - 1, value=index))

    def do_pca(run_dir_v, layer_v):
        try:
            view = run_vectors_view(run_dir_v)
        except (FileNotFoundError, ValueError) as exc:
            return empty_figure("Role vectors (PCA)", str(exc))
        index = min(max(int(layer_v or 0), 0), view.axis.shape[0] - 1)
        fig, _ = pca_figure(view.names, view.role_vectors[:, index], view.axis[index], index,
                            view.default[index] if view.default is not None else None)
        return fig

    # ------------------------------------------------------------------ wiring

    inputs = [run_dir, model_id, role_set, roles, question_count, prompt_count, rollouts_per_prompt, batch_size,
              max_new_tokens, temperature, seed, judge_provider, judge_model, judge_base_url, judge_key,
              judge_limit, min_score, min_count, quantiles]
    outputs = [job_status, log_tail, step_report, overview]
    # These handlers only watch a background job (the job manager runs one at a time): no concurrency limit.
    for step, button in step_buttons.items():
        button.click(start(step), inputs, outputs, api_name=f"pipeline_{step}", concurrency_limit=None)
    all_btn.click(start(ALL), inputs, outputs, api_name="pipeline_all", concurrency_limit=None)
    follow_btn.click(do_follow, [run_dir], outputs, api_name="pipeline_follow", concurrency_limit=None)
    cancel_btn.click(do_cancel, None, [job_status], api_name="pipeline_cancel")
    refresh.click(do_refresh, [run_dir], [overview], api_name="pipeline_overview")
    run_dir.submit(do_refresh, [run_dir], [overview], api_name=False)
    role_set.change(do_role_set, [role_set], [roles], api_name=False)
    role_set.focus(lambda: gr.update(choices=list(roles_data.role_sets(config.workspace))), None, [role_set],
                   api_name=False)
    judge_provider.change(lambda p: DEFAULT_MODELS.get(p, ""), [judge_provider], [judge_model], api_name=False)
    results_btn.click(do_results, [run_dir, result_role, result_text, layer],
                      [responses, histogram, pca_plot, summary_plot, result_role, layer], api_name="pipeline_results")
    layer.release(do_pca, [run_dir, layer], [pca_plot], api_name=False)

    def on_load(demo: gr.Blocks) -> None:
        # A reopened page shows the run's state and the job that may still be running in the background.
        demo.load(lambda run_dir_v: (job_status_markdown(ctx.jobs.active() or ctx.jobs.latest()),
                                     _overview_markdown(run_overview(run_dir_v))),
                  [run_dir], [job_status, overview], api_name=False)

    return on_load
