"""Roles tab: browse the catalog, view / edit / save a role, build roles with an LLM, import a role set."""
from __future__ import annotations

import json
import re

import gradio as gr

from app import roles_data
from app.context import AppContext
from app.tabs.common import as_json, follow_job, job_status_markdown
from pipeline.llm import DEFAULT_MODELS, PROVIDERS
from pipeline.role_schema import EXPECTED_ROLE_QUESTIONS, RoleDataError


def _names(text: str | None) -> tuple[str, ...] | None:
    names = tuple(n for n in re.split(r"[\s,]+", text or "") if n)
    return names or None


def _int_or_none(value) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return int(value)


def build(ctx: AppContext) -> None:
    config = ctx.config
    user_dir = config.user_roles_dir

    def set_folder(label: str | None):
        return roles_data.role_sets(config.workspace).get(label or roles_data.SHIPPED, roles_data.ROLES_DIR)

    gr.Markdown(
        "Personas from the role catalog. Shipped role files live in `data/roles`; roles you save, build or edit "
        f"go to **my roles** (`{user_dir}`), a role set you can pick in the Pipeline tab.")
    with gr.Row():
        role_set = gr.Dropdown(list(roles_data.role_sets(config.workspace)), value=roles_data.SHIPPED,
                               label="Role set", scale=1)
        search = gr.Textbox(label="Search name, category or description", scale=2, elem_id="role-search")
        category = gr.Dropdown(["all"] + roles_data.categories(), value="all", label="Category", scale=1)
        search_btn = gr.Button("Search", scale=0)
    table = gr.Dataframe(roles_data.catalog_table(user_dir=user_dir), interactive=False, wrap=True,
                         max_height=330, label="Catalog (click a row to view the role)")
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Row():
                role_name = gr.Textbox(label="Role", scale=3)
                view_btn = gr.Button("View", scale=1)
            role_view = gr.Markdown("", elem_id="role-view")
        with gr.Column():
            editor = gr.Code(language="json", label="Edit (role file JSON)", lines=18)
            with gr.Row():
                save_name = gr.Textbox(label="Save as", scale=3)
                save_btn = gr.Button("Save to my roles", variant="primary", scale=1)
            save_status = gr.Markdown("")

    with gr.Accordion("Build roles with an LLM (pipeline.build_roles)", open=False):
        gr.Markdown("Writes a role file for each chosen catalog persona that has none in **my roles**. "
                    "The API key may also come from ANTHROPIC_API_KEY / OPENAI_API_KEY.")
        with gr.Row():
            provider = gr.Dropdown(list(PROVIDERS), value="anthropic", label="Provider")
            llm_model = gr.Textbox(value=DEFAULT_MODELS["anthropic"], label="Model")
            base_url = gr.Textbox(label="Base URL (openai-compatible, proxies)")
            api_key = gr.Textbox(label="API key (optional if set in the environment)", type="password")
        with gr.Row():
            build_roles_text = gr.Textbox(label="Catalog roles (names, comma separated; empty = use the range)")
            start = gr.Number(value=None, precision=0, label="catalog start")
            end = gr.Number(value=None, precision=0, label="catalog end")
            n_questions = gr.Number(value=EXPECTED_ROLE_QUESTIONS, precision=0, label="questions per role")
        with gr.Row():
            build_btn = gr.Button("Build roles", variant="primary")
            build_cancel = gr.Button("Cancel")
        build_status = gr.Markdown("")
        build_report = gr.JSON(label="report")

    with gr.Accordion("Import a role set (pipeline.role_import)", open=False):
        gr.Markdown("A folder in the paper's layout (`<role>.json` incl. `default.json`, plus "
                    "`extraction_questions.jsonl`) from a local path, a git URL or `hf:owner/dataset`. "
                    "It is copied to an imported role set you can pick in the Pipeline tab.")
        with gr.Row():
            source = gr.Textbox(label="Source", placeholder="hf:owner/name, https://.../repo.git or /path/to/roles")
            kind = gr.Dropdown(["auto", "path", "git", "hf"], value="auto", label="Kind")
            revision = gr.Textbox(label="Revision (git / Hub)")
            subdir = gr.Textbox(label="Folder inside the source")
        with gr.Row():
            import_roles_text = gr.Textbox(label="Only these roles (optional)")
            set_name = gr.Textbox(value="imported", label="Name of the imported set")
            overwrite = gr.Checkbox(value=False, label="Replace an existing set of that name")
            import_btn = gr.Button("Import", variant="primary")
        import_report = gr.JSON(label="import report")

    # ------------------------------------------------------------------ callbacks

    def do_search(query, cat, set_label):
        return roles_data.catalog_table(query, cat, user_dir=user_dir, role_set=set_folder(set_label))

    def do_select(evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row else gr.update()

    def do_view(name, set_label):
        name = (name or "").strip()
        if not name:
            raise gr.Error("type or pick a role name")
        folders = [set_folder(set_label), user_dir, roles_data.ROLES_DIR]
        try:
            role = roles_data.find_role(name, folders)
        except RoleDataError as exc:
            raise gr.Error(str(exc)) from None
        if role is not None:
            return roles_data.role_markdown(role), roles_data.role_json(role), name
        entry = roles_data.catalog_entry(name)
        if entry is None:
            raise gr.Error(f"no role called {name!r} in the catalog or in the role sets")
        template = roles_data.new_role_template(name, entry.description)
        text = (f"### {name}\n\n*{entry.category}*: {entry.description}\n\nNo role file yet: edit the template "
                "on the right and save it, or build it with an LLM below.")
        return text, json.dumps(template, indent=2), name

    def do_save(name, text):
        try:
            path = roles_data.save_role(user_dir, (name or "").strip(), text or "")
        except RoleDataError as exc:
            raise gr.Error(str(exc)) from None
        return f"Saved `{path}`", gr.update(choices=list(roles_data.role_sets(config.workspace)))

    def do_build(provider_v, model_v, base_url_v, key_v, names_v, start_v, end_v, n_q, progress=gr.Progress()):
        from pipeline.build_roles import BuildRolesConfig, build_roles
        from pipeline.llm import LLMConfig, check_api_key

        try:
            llm = LLMConfig(provider=provider_v, model=(model_v or "").strip() or DEFAULT_MODELS.get(provider_v, ""),
                            base_url=(base_url_v or "").strip() or None, api_key=(key_v or "").strip() or None)
            check_api_key(llm)
            build_config = BuildRolesConfig(llm=llm, output_dir=user_dir, roles=_names(names_v),
                                            start=_int_or_none(start_v), end=_int_or_none(end_v),
                                            n_questions=int(n_q or EXPECTED_ROLE_QUESTIONS))
        except Exception as exc:  # bad settings or a missing key: say so before starting
            raise gr.Error(str(exc)) from None
        roles_data.ensure_user_role_set(user_dir)
        try:
            job = ctx.llm_jobs.submit(
                "build roles", lambda j: build_roles(build_config, progress=j.progress, stop_event=j.stop_event))
        except Exception as exc:
            raise gr.Error(str(exc)) from None
        for out in follow_job(job, progress, lambda j: (job_status_markdown(j), gr.update())):
            yield out
        report = job.result.as_dict() if job.result is not None else {"error": job.error, "log": job.log_tail(20)}
        yield job_status_markdown(job), as_json(report)

    def do_cancel_build():
        job = ctx.llm_jobs.cancel()
        return job_status_markdown(job)

    def do_import(source_v, kind_v, revision_v, subdir_v, names_v, set_name_v, overwrite_v):
        from pipeline.hub import hub_endpoint
        from pipeline.role_import import ImportRolesConfig, import_roles

        name = (set_name_v or "").strip()
        if not re.fullmatch(r"[\w.-]+", name):
            raise gr.Error("name the imported set with letters, digits, '-', '_' or '.'")
        try:
            report = import_roles(ImportRolesConfig(
                source=source_v or "", dest_dir=roles_data.imported_root(config.workspace) / name, kind=kind_v,
                revision=(revision_v or "").strip() or None, subdir=(subdir_v or "").strip() or None,
                roles=_names(names_v), overwrite=bool(overwrite_v), hf_endpoint=hub_endpoint()))
        except (RoleDataError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        sets = list(roles_data.role_sets(config.workspace))
        return as_json(report.as_dict()), gr.update(choices=sets, value=roles_data.IMPORTED_PREFIX + name)

    # ------------------------------------------------------------------ wiring

    search_inputs = [search, category, role_set]
    search_btn.click(do_search, search_inputs, [table], api_name="roles_search")
    search.submit(do_search, search_inputs, [table], api_name=False)
    category.change(do_search, search_inputs, [table], api_name=False)
    role_set.change(do_search, search_inputs, [table], api_name=False)
    table.select(do_select, None, [role_name], api_name=False).then(
        do_view, [role_name, role_set], [role_view, editor, save_name], api_name=False)
    view_btn.click(do_view, [role_name, role_set], [role_view, editor, save_name], api_name="role_view")
    role_name.submit(do_view, [role_name, role_set], [role_view, editor, save_name], api_name=False)
    save_btn.click(do_save, [save_name, editor], [save_status, role_set], api_name="role_save")
    build_btn.click(do_build, [provider, llm_model, base_url, api_key, build_roles_text, start, end, n_questions],
                    [build_status, build_report], api_name="build_roles", concurrency_limit=None)
    build_cancel.click(do_cancel_build, None, [build_status], api_name=False)
    provider.change(lambda p: DEFAULT_MODELS.get(p, ""), [provider], [llm_model], api_name=False)
    import_btn.click(do_import, [source, kind, revision, subdir, import_roles_text, set_name, overwrite],
                     [import_report, role_set], api_name="import_roles")
