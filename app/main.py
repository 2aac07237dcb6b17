"""The Gradio app: roles, pipeline, steer & cap chat, persona dynamics and Hub tabs over one shared model,
one heavy-work slot and background jobs.

``build_demo()`` makes the gr.Blocks; ``launch()`` starts it (theme and CSS are launch options in
Gradio 6; host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when set).
"""
from __future__ import annotations

import os

import gradio as gr

from app.context import AppContext
from app.settings import AppConfig
from app.tabs import chat, dynamics, hub, pipeline, roles

TITLE = "Assistant Axis Lab"
CSS = """
#chat-status, #job-status {min-height: 1.5em}
.gradio-container {max-width: 1500px !important}
"""
HEADER = f"""# {TITLE}
Compute and use the **Assistant Axis** of a chat model (Lu et al. 2026,
[arXiv:2601.10387](https://arxiv.org/abs/2601.10387)): role-play responses -> mean activations -> judge scores ->
per-role vectors -> `axis = mean(default) - mean(roles)` per layer; then steer (add `c x axis`) or cap (a floor
`tau` on the projection) while chatting."""


def build_demo(config: AppConfig | None = None, ctx: AppContext | None = None) -> gr.Blocks:
    ctx = ctx or AppContext(config=config or AppConfig())
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(HEADER)
        axis_state = gr.State(None)  # the chat's axis (app.chat_engine.AxisChoice), set by the chat and Hub tabs
        with gr.Tabs():
            with gr.Tab("Roles", id="roles"):
                roles.build(ctx)
            with gr.Tab("Pipeline", id="pipeline"):
                pipeline_on_load = pipeline.build(ctx)
            with gr.Tab("Steer & cap chat", id="chat", elem_id="chat-tab"):
                chat.build(ctx, axis_state)
            with gr.Tab("Persona dynamics", id="dynamics"):
                dynamics.build(ctx, axis_state)
            with gr.Tab("Hub", id="hub"):
                hub.build(ctx, axis_state)
        pipeline_on_load(demo)
    demo.queue(default_concurrency_limit=4)
    demo.app_context = ctx  # for tests and scripts
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Start the app; keyword arguments override the defaults (e.g. ``prevent_thread_lock=True``)."""
    options = dict(theme=gr.themes.Soft(), css=CSS, show_error=True)
    if os.environ.get("GRADIO_SERVER_NAME"):
        options["server_name"] = os.environ["GRADIO_SERVER_NAME"]
    if os.environ.get("GRADIO_SERVER_PORT"):
        options["server_port"] = int(os.environ["GRADIO_SERVER_PORT"])
    options.update(kwargs)
    return demo.launch(**options)
