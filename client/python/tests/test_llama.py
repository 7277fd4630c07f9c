"""The LLaMA-style model end to end at `tiny`: 2 PyTorch workers through 2 shards
end, after 20 steps on real text (clipped at 1.0, as the recipes clip), where one
process on the whole batch ends: with AdamW against `torch.optim.AdamW`, and with
AdamSN against a torch version of algorithms.md §2 written here; 1-bit pushes
against EF-signSGD into AdamW (and 1-bit Adam's frozen variance); and the Rust
worker's candle decoder training one model with a PyTorch worker."""

from __future__ import annotations

import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (Debian's python3-torch provides it for the tests)")

import paramserver as ps  # noqa: E402
import paramserver.torch as pst  # noqa: E402
from paramserver import data  # noqa: E402
from paramserver.models import llama  # noqa: E402
from conftest import binary  # noqa: E402

STEPS, SEQUENCES, SEQ_LEN, SEED = 20, 8, 64, 5


class AdamSN(torch.optim.Optimizer):
    """Adam-SN (algorithms.md §2) with the heuristic subsets: a matrix's squared gradients
    summed per row when it has at least as many rows as columns, else per column, a 1-D
    tensor's per coordinate; m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) s;
    W <- W - lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps); then W <- W (1 - lr wd)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                g = p.grad.reshape(p.shape[0], -1) if p.dim() >= 2 else p.grad
                state = self.state[p]
                if not state:
                    state["t"], state["m"] = 0, torch.zeros_like(g)
                    state["v"] = torch.zeros(g.shape[0], 1) if p.dim() >= 2 and g.shape[0] >= g.shape[1] else torch.zeros(1, g.shape[1]) if p.dim() >= 2 else torch.zeros_like(g)
                state["t"] += 1
                t = state["t"]
                if p.dim() >= 2:
                    s = (g * g).sum(1, keepdim=True) if state["v"].shape[1] == 1 else (g * g).sum(0, keepdim=True)
                else:
                    s = g * g
                state["v"].mul_(b2).add_((1 - b2) * s)
                state["m"].mul_(b1).add_((1 - b1) * g)
                alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                update = alpha * state["m"] / (state["v"].sqrt() + group["eps"])
                p.sub_(update.reshape(p.shape))
                p.mul_(1 - lr * group["weight_decay"])


def _modes():
    adam_sn = ps.pb.OptimizerConfig(
        subset_norm=ps.pb.SubsetNormConfig(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, correct_bias=True, weight_decay=0.1, subsets=ps.pb.SUBSET_KIND_HEURISTIC)
    )
    return {
        "adamw": (ps.adamw(2e-3, weight_decay=0.1), lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1)),
        "adam-sn": (adam_sn, lambda params: AdamSN(params, lr=0.01, weight_decay=0.1)),
    }


@pytest.mark.parametrize("mode", ["adamw", "adam-sn"])
def test_two_workers_train_tiny_llama_through_two_shards_as_one_process_does(shards, mode):
    optimizer, reference_optimizer = _modes()[mode]
    corpus = data.stdlib_corpus(max_bytes=400_000)
    nets = [llama.build("tiny", seed=SEED) for _ in range(2)]
    assert llama.parameter_count("tiny") == sum(p.numel() for p in nets[0].parameters())
    values = ps.arrays_of(nets[0])
    spec = ps.model_spec(f"llama-tiny-{mode}", values, [ps.group("all", ["*"], optimizer)], max_grad_norm=1.0, max_block_elements=1 << 15)
    client = shards.client()
    models = [client.register(spec, values), client.model(spec.name)]
    assert len({b.shard for t in models[0].tensors.values() for b in t.blocks}) == 2, "the model spans both shards"
    workers = [pst.attach(nets[r], models[r], f"torch-{r}", rank=r) for r in range(2)]
    reference = llama.build("tiny", seed=SEED)
    local = reference_optimizer(reference.parameters())

    def run(rank: int) -> int:
        batch = data.rank_batch(corpus.train, step, SEQUENCES, SEQ_LEN, SEED, rank, 2)
        nets[rank].loss(torch.from_numpy(batch)).backward()
        return workers[rank].step()

    first_loss = None
    for step in range(STEPS):
        local.zero_grad()
        loss = reference.loss(torch.from_numpy(data.global_batch(corpus.train, step, SEQUENCES, SEQ_LEN, SEED)))
        loss.backward()
        first_loss = first_loss if first_loss is not None else float(loss)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        local.step()
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(run, range(2))) == [step + 1] * 2
    worst = 0.0
    for net in nets:
        for (name, p), q in zip(net.named_parameters(), reference.parameters()):
            difference = float((p.detach() - q.detach()).abs().max())
            worst = max(worst, difference)
            assert difference <= 1e-5, f"{name}: {difference}"
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(reference.parameters(), llama.build("tiny", seed=SEED).parameters()))
    print(f"{mode}: loss {first_loss:.3f} -> {float(loss):.3f}; the weights moved up to {moved:.4f}, the two runs differ by {worst:.2e}")
    assert float(loss) < first_loss - 0.5, "it learns"
    for worker in workers:
        worker.close()


def _frozen_adamw_step(optimizer: torch.optim.AdamW, frozen_at: int) -> None:
    """torch.optim.AdamW's step (weight decay 0) with exp_avg_sq and its bias correction
    kept as they were after step `frozen_at`: 1-bit Adam's compression stage."""
    for group in optimizer.param_groups:
        (b1, b2), lr, eps = group["betas"], group["lr"], group["eps"]
        for p in group["params"]:
            state = optimizer.state[p]
            state["step"] += 1
            t = int(state["step"])
            state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**frozen_at)).add_(eps)
            p.data.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


@pytest.mark.parametrize("warm", [0, 4])
def test_one_bit_pushes_with_error_feedback_train_as_ef_signsgd_into_adamw_does(shards, warm):
    """A group pushed as sign1: each worker sends sign(g + e) times ||g + e||_1 / d per tensor
    and keeps e (algorithms.md section 6); the shards run AdamW on the clipped mean. The
    reference does each rank's part in one process. With `warm` steps of 1-bit Adam's
    recipe: the first `warm` steps push f32 (no residual yet), and from then on the shards'
    AdamW keeps v and its correction as they were after step `warm`; the token embedding
    is then pushed in f32 by a group of its own (the rows of bytes no batch held have
    v = 0, which a sign would move by lr * scale / eps: docs/optimizers.md)."""
    corpus = data.stdlib_corpus(max_bytes=400_000)
    nets = [llama.build("tiny", seed=SEED) for _ in range(2)]
    values = ps.arrays_of(nets[0])
    full = ["embed_tokens.weight"] if warm else []
    groups = [ps.group("embeddings", full, ps.adamw(2e-3), push_encodings=["f32"])] if warm else []
    encodings = ["sign1", "f32"] if warm else ["sign1"]
    groups.append(ps.group("all", ["*"], ps.adamw(2e-3, freeze_variance_after=warm), push_encodings=encodings))
    spec = ps.model_spec(f"llama-tiny-ef-{warm}", values, groups, max_grad_norm=1.0, max_block_elements=1 << 15)
    client = shards.client()
    if not warm:
        # A frozen v with 1-bit pushes needs f32 for its warm-up: refused at registration.
        frozen = ps.group("all", ["*"], ps.adamw(2e-3, freeze_variance_after=3), push_encodings=["sign1"])
        with pytest.raises(ps.ServerError, match="must list ENCODING_F32 after ENCODING_SIGN1"):
            client.register(ps.model_spec("llama-tiny-ef-refused", values, [frozen]), values)
    models = [client.register(spec, values), client.model(spec.name)]
    assert {t.full_precision_steps for n, t in models[1].tensors.items() if n not in full} == {warm}, "the layout says the warm-up"
    workers = [pst.attach(nets[r], models[r], f"torch-{r}", rank=r) for r in range(2)]
    reference = llama.build("tiny", seed=SEED)
    compressed = [p for name, p in reference.named_parameters() if name not in full]
    local = torch.optim.AdamW(compressed, lr=2e-3, weight_decay=0.0)
    embeddings = torch.optim.AdamW([p for name, p in reference.named_parameters() if name in full] or [torch.zeros(1)], lr=2e-3, weight_decay=0.0)
    residuals = [[torch.zeros_like(p) for p in compressed] for _ in range(2)]

    def run(rank: int) -> int:
        batch = data.rank_batch(corpus.train, step, SEQUENCES, SEQ_LEN, SEED, rank, 2)
        nets[rank].loss(torch.from_numpy(batch)).backward()
        return workers[rank].step()

    for step in range(10):
        sent = []
        for rank in range(2):
            reference.zero_grad()
            reference.loss(torch.from_numpy(data.rank_batch(corpus.train, step, SEQUENCES, SEQ_LEN, SEED, rank, 2))).backward()
            signs = {}
            for name, p in reference.named_parameters():
                signs[name] = p.grad.clone()
            for (name, p), e in zip([(n, p) for n, p in reference.named_parameters() if n not in full], residuals[rank]):
                if step < warm:
                    continue
                q = p.grad + e
                scale = torch.tensor(float(q.double().abs().mean()), dtype=torch.float32)
                signs[name] = torch.where(q >= 0, scale, -scale)
                e.copy_(q - signs[name])
            sent.append(signs)
        for name, p in reference.named_parameters():
            p.grad = (sent[0][name] + sent[1][name]) * 0.5
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        if warm and step >= warm:
            _frozen_adamw_step(local, warm)
        else:
            local.step()
        if full:
            embeddings.step()
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(run, range(2))) == [step + 1] * 2
    # Signs are not continuous: an element whose g + e sits at zero can take the other sign
    # when the two runs' gradients differ in their last bits, and then moves by up to lr
    # the other way. Such elements are rare; every other one equals the reference.
    for net in nets:
        differences = torch.cat([(p.detach() - q.detach()).abs().reshape(-1) for p, q in zip(net.parameters(), reference.parameters())])
        flipped = int((differences > 1e-5).sum())
        print(f"{flipped} of {len(differences)} elements differ by more than 1e-5 (at most {float(differences.max()):.1e})")
        assert flipped <= 0.002 * len(differences)
        assert float(differences.median()) <= 1e-7
    assert workers[0]._residuals and all(float(np.abs(e).max()) > 0 for e in workers[0]._residuals.values()), "residuals are kept"
    for worker in workers:
        worker.close()


def test_a_candle_worker_and_a_torch_worker_train_one_llama(shards):
    """The Rust worker's `llama-tiny` task (worker/src/task/llama.rs) is this decoder in
    candle, with the same tensor names and shapes: it registers the model and trains rank 1
    on its shipped text while a PyTorch worker opens the same model and trains rank 0 on
    the standard library's source; the validation loss falls for both."""
    steps = 8
    rust = subprocess.Popen(
        [
            str(binary("worker")), "train", "--task", "llama-tiny", "--shards", ",".join(shards.addrs), "--world-size", "2",
            "--rank", "1", "--steps", str(steps), "--batch-size", "2", "--lr", "0.003", "--worker-id", "candle-1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = shards.client()
        for _ in range(600):
            try:
                model = client.model("llama-tiny")
                break
            except ps.ServerError:
                time.sleep(0.1)
        else:
            pytest.fail("the Rust worker did not register llama-tiny")
        net = llama.build("tiny", seed=SEED)
        worker = pst.attach(net, model, "torch-0", rank=0)
        corpus = data.stdlib_corpus(max_bytes=400_000)
        windows = torch.from_numpy(data.global_batch(corpus.validation, 0, 4, SEQ_LEN, SEED))
        with torch.no_grad():
            before = float(net.loss(windows))
        for step in range(steps):
            batch = data.rank_batch(corpus.train, step, 4, SEQ_LEN, SEED, 0, 2)
            net.loss(torch.from_numpy(batch)).backward()
            assert worker.step() == step + 1
        with torch.no_grad():
            after = float(net.loss(windows))
        worker.close()
        _, err = rust.communicate(timeout=300)
        assert rust.returncode == 0, err[-3000:]
    finally:
        rust.kill()
    print(f"validation loss {before:.3f} -> {after:.3f} in {steps} steps of a candle and a PyTorch worker")
    assert after < before - 1.0
