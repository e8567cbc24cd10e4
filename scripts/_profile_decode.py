import time, torch, sys
sys.path.insert(0, "scripts")
from bench_decode import build
from gill.generate import DecodeOptions, decode
size = sys.argv[1] if len(sys.argv) > 1 else "small"
dev = "cuda" if torch.cuda.is_available() else "cpu"
dt = torch.bfloat16 if dev == "cuda" else torch.float32
m = build(size, dev, dt)
lm = m.lm
ids = torch.randint(4, 1000, (1, 128), device=dev)
N = 32
def sync():
    if dev == "cuda": torch.cuda.synchronize()
def timeit(name, fn, reps=3):
    fn(); sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t)
    print(f"{name:50s} {N / min(ts):8.1f} tok/s  ({min(ts) / N * 1000:.2f} ms/tok)", flush=True)

@torch.no_grad()
def raw_ids():
    out = lm(input_ids=ids, use_cache=True)
    pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(N - 1):
        out = lm(input_ids=tok, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tok.item()

@torch.no_grad()
def raw_ids_sync():
    out = lm(input_ids=ids, use_cache=True)
    pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(N - 1):
        out = lm(input_ids=tok, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True); tok.item()

@torch.no_grad()
def raw_hidden_mask():
    mask = torch.ones_like(ids)
    out = lm(input_ids=ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
    pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(N - 1):
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        out = lm(input_ids=tok, attention_mask=mask, past_key_values=pkv, use_cache=True, output_hidden_states=True)
        pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True); tok.item()

@torch.no_grad()
def ours_forward():
    mask = torch.ones_like(ids)
    out = m.lm_forward(m.embed_tokens(ids), mask, use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(N - 1):
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        out = m.lm_forward(m.embed_tokens(tok), mask, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values; tok = out.logits[:, -1].argmax(-1, keepdim=True); tok.item()

emb = m.embed_tokens(ids)
mask = torch.ones_like(ids)
opts = DecodeOptions(max_new_tokens=N, allow_images=False, stop_on_eos=False)
def ours_decode():
    decode(m, emb, mask, opts)

def hf_generate():
    with torch.no_grad():
        lm.generate(input_ids=ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)

for name, fn in [("HF raw ids, no sync", raw_ids), ("HF raw ids, .item() per step", raw_ids_sync),
                 ("HF + mask + output_hidden_states", raw_hidden_mask), ("ours lm_forward loop", ours_forward),
                 ("ours decode()", ours_decode), ("HF generate()", hf_generate)]:
    timeit(name, fn)
if dev == "cuda":
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours_decode()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
