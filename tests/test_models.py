import pytest
import torch

from steering.chat_format import ChatTemplateError
from steering.models import ModelLoadError, ModelSpec, load_model, wrap_in_bridge


def test_tiny_model_loads_with_raw_hf_weights(tiny_model):
    m = tiny_model
    assert (m.n_layers, m.d_model) == (4, 64)
    ids = torch.tensor([m.chat.prompt_ids("You are a ghost.", "Where do you live?")])
    with torch.no_grad():
        out = m.hf_model(input_ids=ids, output_hidden_states=True)
        store = {}
        hooks = [(f"blocks.{l}.hook_out", lambda x, hook: store.__setitem__(hook.name, x.clone()))
                 for l in range(m.n_layers)]
        logits = m.bridge.run_with_hooks(ids, fwd_hooks=hooks, return_type="logits")
    assert torch.allclose(logits, out.logits, atol=1e-5)
    # block output i == HF hidden_states[i + 1] (the last one in HF has the final norm applied)
    for l in range(m.n_layers - 1):
        assert torch.allclose(store[f"blocks.{l}.hook_out"], out.hidden_states[l + 1], atol=1e-5)


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model.*offline"):
        load_model(ModelSpec(model_id="no-such-org/no-such-model"))


def test_missing_chat_template(tiny_model_dir, tmp_path):
    import shutil
    import json
    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_model(ModelSpec(model_id=str(copy)))


def test_model_transformerlens_cannot_wrap(tiny_model):
    class Strange(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type(tiny_model.hf_model.config)()
            self.config.architectures = ["StrangeNetForCausalLM"]
            self.config.model_type = "strangenet"
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(ModelLoadError, match="TransformerLens cannot wrap.*StrangeNetForCausalLM"):
        wrap_in_bridge(Strange(), tiny_model.tokenizer, "strange/net", torch.float32)


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        ModelSpec(dtype="float8").torch_dtype()
