"""What a chat sends back to the model: an attached picture as a picture, a shown one as its [IMG] tokens (the
original demo's history: the answer's strings, "[IMG0]...[IMG7]" in them, never the picture it showed)."""

from PIL import Image

from app.app import build_demo
from gill.settings import RunSettings


def test_a_shown_picture_goes_back_as_its_img_tokens_an_attached_one_as_a_picture(tiny_gill, tmp_path, monkeypatch):
    demo = build_demo(tiny_gill, RunSettings(steps=2, max_new_tokens=16, img_scale_factor=1.0), policy="both")
    fn = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "respond")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "in.png")
    controls = (0.0, 0.95, 16, 1.0, "both", 2, 7.5, 0)
    prompts, streamed = [], []
    real = tiny_gill.stream

    def spy(items, **kw):
        prompts.append(list(items))
        streamed.append([])
        for s in real(items, **kw):
            streamed[-1].append(s)
            yield s

    monkeypatch.setattr(tiny_gill, "stream", spy)
    messages, state = [], None
    for message in ({"text": "a red circle", "files": [str(tmp_path / "in.png")]}, {"text": "it turns blue.", "files": []}):
        messages, state, _ = list(fn(message, messages, state, *controls))[-1]
    first, second = prompts
    shown = [s for s in streamed[0] if type(s).__name__ in ("GeneratedImage", "RetrievedImage")]
    assert shown  # (the tiny model with large [IMG] rows answers with pictures)
    # the second prompt: the attached picture, the first question, the first answer with an [IMG] group per
    # shown picture, then the new question; no shown picture as a picture
    pictures = [x for x in second if isinstance(x, Image.Image)]
    assert len(pictures) == 1 and pictures[0].size == (40, 40) and second[0] is pictures[0]
    assert second[1] == "Q: a red circle\nA:" and second[-1] == "Q: it turns blue.\nA:"
    answer = second[2]
    img = tiny_gill.img_tokens.text
    assert answer.count(img) == len(shown) and answer.endswith("\n") and len(second) == 4
    text = "".join(s.text for s in streamed[0] if type(s).__name__ in ("Text", "TextDelta"))
    assert answer.replace(img, "").rstrip() == text.split("\nQ:")[0].split("\nA:")[0].rstrip()
    # read back through the tokenizer, each group is the [IMG] ids in order, as the model produced them
    ids = tiny_gill.tokenizer(answer, add_special_tokens=False)["input_ids"]
    group = list(tiny_gill.img_tokens.ids)
    starts = [i for i, t in enumerate(ids) if t == group[0]]
    assert len(starts) == len(shown) and all(ids[i:i + len(group)] == group for i in starts)
    assert len(first) == 2  # (the first prompt: the attached picture and the question)


def test_training_reads_a_chats_earlier_img_groups_as_text_and_takes_the_appended_groups_states(tiny_opt):
    """A chat sample (training.toy.data) holds earlier answers' [IMG] groups in its text, as the app's history
    does: the [IMG]-token forward takes the states of the group it appends (one per sample, batched with a
    plain caption), the earlier groups' [IMG0] and the text after them are targets, their [IMG1..] are not."""
    import torch

    from gill.model import GILLModel
    from training.step import img_token_forward, img_token_inputs, tokenize

    backbones, config = tiny_opt
    model = GILLModel(backbones.lm, backbones.vision, config).eval()
    tok = backbones.tokenizer
    img_text = "".join(tok.convert_ids_to_tokens(config.tokens.img_token_ids))
    chat = f"Q: a red circle.\nA: a red circle.{img_text}\nQ: it turns blue.\nA: now it is a blue circle."
    text = tokenize(tok, [chat, "a green square"], 96, 8)
    ids, mask, labels, (rows, cols) = img_token_inputs(model, text, concat=False, device="cpu")
    img = config.tokens.img_token_ids
    first = text.captions[0]
    assert rows.tolist() == [[0] * 8, [1] * 8]
    assert cols.tolist() == [list(range(len(first), len(first) + 8)), list(range(len(text.captions[1]), len(text.captions[1]) + 8))]
    inner = first.index(img[0])
    assert first[inner:inner + 8] == img  # the earlier picture's group, read from the text
    assert labels[0, inner].item() == img[0] and (labels[0, inner + 1:inner + 8] == -100).all()
    assert (labels[0, inner + 8:len(first)] == torch.tensor(first[inner + 8:])).all()  # the text after it: targets
    with torch.no_grad():
        out, _, hidden = img_token_forward(model, text, False, "cpu")
    assert hidden.shape == (2, 8, config.lm_hidden_size)
    torch.testing.assert_close(hidden[0], out.hidden[0, len(first):len(first) + 8])
