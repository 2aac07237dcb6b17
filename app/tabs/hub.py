"""Hub tab: download an axis (native or the paper's layout) for the chat, upload a run's axis (pipeline.hub)."""
import gradio as gr

from app.chat_engine import AxisChoice
from app.context import AppContext
from app.tabs.common import as_json
from pipeline import hub
from steering.axis_io import AxisFileError


def build(ctx: AppContext, axis_state: gr.State) -> None:
    config = ctx.config
    gr.Markdown(
        f"Axes on the Hugging Face Hub. The paper's vectors are in the dataset `{hub.PAPER_REPO}` "
        "(one folder per model: `assistant_axis.pt`, `role_vectors/`, `capping_config.pt`); axes uploaded from "
        "this app use the native `axis.safetensors` format. Endpoint: `HF_ENDPOINT` or the public Hub.")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### Download an axis")
            with gr.Row():
                repo_id = gr.Textbox(value=hub.PAPER_REPO, label="Repository", scale=3)
                repo_type = gr.Radio(list(hub.REPO_TYPES), value=hub.PAPER_REPO_TYPE, label="Type", scale=1)
            with gr.Row():
                folder = gr.Dropdown([], value=None, allow_custom_value=True, label="Folder (model)", scale=3)
                list_btn = gr.Button("List folders", scale=1)
            with gr.Row():
                revision = gr.Textbox(label="Revision (branch, tag or commit; empty = main)")
                with_roles = gr.Checkbox(value=False, label="also role vectors (large for big models)")
            download_token = gr.Textbox(label="Token (only for private or gated repos; HF_TOKEN otherwise)",
                                        type="password")
            download_btn = gr.Button("Download and use in the chat", variant="primary")
            download_status = gr.Markdown("", elem_id="hub-download-status")
            download_info = gr.JSON(label="downloaded axis")
        with gr.Column():
            gr.Markdown("### Upload a run's axis")
            if config.on_space:
                gr.LoginButton()
            upload_run_dir = gr.Textbox(value=config.default_run_dir(), label="Run directory")
            with gr.Row():
                upload_repo = gr.Textbox(label="Repository (owner/name)", scale=3)
                upload_type = gr.Radio(list(hub.REPO_TYPES), value="dataset", label="Type", scale=1)
            with gr.Row():
                upload_folder = gr.Textbox(label="Folder in the repository (optional, e.g. the model name)")
                private = gr.Checkbox(value=False, label="private")
            upload_token = gr.Textbox(label="Token with write access (or sign in / HF_TOKEN)", type="password")
            upload_btn = gr.Button("Upload", variant="primary")
            upload_status = gr.Markdown("")
            upload_info = gr.JSON(label="upload report")

    # ------------------------------------------------------------------ callbacks

    def do_list(repo, kind, rev, token):
        try:
            folders = hub.list_axis_folders((repo or "").strip(), repo_type=kind, revision=(rev or "").strip() or None,
                                            token=token or None)
        except hub.HubError as exc:
            raise gr.Error(str(exc)) from None
        if not folders:
            raise gr.Error(f"{repo}: no folder holds an axis file")
        names = list(folders)
        labels = [(f"{f or '(root)'} [{layout}]", f) for f, layout in folders.items()]
        return gr.update(choices=labels, value=names[0])

    def do_download(repo, kind, folder_v, rev, roles, token):
        info = ctx.models.info
        try:
            got = hub.download_axis(
                (repo or "").strip(), (folder_v or "").strip() or None, repo_type=kind,
                revision=(rev or "").strip() or None, token=token or None, role_vectors=bool(roles),
                expect_shape=(info.n_layers, info.d_model) if info is not None else None,
                model_id=info.model_id if info is not None else None)
        except (hub.HubError, AxisFileError) as exc:
            raise gr.Error(str(exc)) from None
        choice = AxisChoice(got.bundle, source=got.source, capping=got.capping)
        fit = (f"fits the loaded model {info.model_id}" if info is not None
               else "the fit to the model is checked when the chat loads it")
        return choice, f"Downloaded {choice.summary()}; {fit}. The chat tab now uses this axis.", \
            as_json(got.summary())

    def do_upload(run_dir, repo, kind, folder_v, private_v, token, oauth_token: gr.OAuthToken | None = None):
        chosen = (token or "").strip() or (oauth_token.token if oauth_token is not None else None)
        try:
            report = hub.upload_run((run_dir or "").strip(), (repo or "").strip(), token=chosen, repo_type=kind,
                                    private=bool(private_v), folder=(folder_v or "").strip())
        except (hub.HubError, AxisFileError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        return f"Uploaded {len(report.files)} files to [{report.repo_id}]({report.repo_url})", as_json(report.as_dict())

    list_btn.click(do_list, [repo_id, repo_type, revision, download_token], [folder], api_name="hub_folders")
    download_btn.click(do_download, [repo_id, repo_type, folder, revision, with_roles, download_token],
                       [axis_state, download_status, download_info], api_name="hub_download")
    upload_btn.click(do_upload, [upload_run_dir, upload_repo, upload_type, upload_folder, private, upload_token],
                     [upload_status, upload_info], api_name="hub_upload")
