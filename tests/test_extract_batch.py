"""extract_batch on the tiny model: exact span means, stops after the last requested layer."""
import torch

from pipeline.extract import SpanItem, extract_batch, make_batches


def _items(model):
    items = []
    for i, (system, question, answer) in enumerate([
        ("You are a pirate.", "Who are you?", "Arr, a pirate of the seven seas!"),
        (None, "What do you value most?", "Honesty and curiosity."),
        ("You are a ghost.", "Where do you live?", "In the old house at midnight, whispering secrets to the walls."),
    ]):
        messages = model.chat.build_messages(system, [{"role": "user", "content": question}])
        span = model.chat.response_span(messages + [{"role": "assistant", "content": answer}])
        items.append(SpanItem(f"r{i}", "x", span.input_ids, span.start, span.end))
    return items


def test_batched_means_equal_single_forward_and_forward_stops_early(tiny_model):
    m = tiny_model
    items = _items(m)
    calls = {"lm_head": 0, "last_block": 0}
    handles = [m.hf_model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
               m.hf_model.model.layers[3].register_forward_hook(
                   lambda *a: calls.__setitem__("last_block", calls["last_block"] + 1))]
    try:
        out = extract_batch(m, items, [0, 2], "mean")
    finally:
        for h in handles:
            h.remove()
    assert calls == {"lm_head": 0, "last_block": 0}
    for item, tensor in zip(items, out):
        with torch.no_grad():
            hidden = m.hf_model(input_ids=torch.tensor([item.input_ids]), output_hidden_states=True).hidden_states
        assert tensor.shape == (2, m.d_model)
        for row, layer in enumerate([0, 2]):
            direct = hidden[layer + 1][0, item.start:item.end].mean(0)
            assert torch.allclose(tensor[row], direct, atol=1e-5)
    last = extract_batch(m, items, [3], "last")
    per_token = extract_batch(m, items, [3], "none")
    for item, l, t in zip(items, last, per_token):
        assert t.shape == (item.end - item.start, 1, m.d_model)
        assert torch.allclose(l[0], t[-1, 0], atol=1e-6)


def test_batches_are_sorted_by_length_and_capped():
    items = [SpanItem(f"r{i}", "x", list(range(n)), 0, n) for i, n in enumerate([50, 10, 30, 20, 40])]
    batches = make_batches(items, batch_size=2, max_batch_tokens=70)
    lengths = [[len(i.input_ids) for i in b] for b in batches]
    assert lengths == [[10, 20], [30], [40], [50]]
    assert all(len(b) * max(len(i.input_ids) for i in b) <= 70 for b in batches)
