"""zeroconv's training step against diffusers' train_controlnet.py, term by term, on the same batches and draws.

    python bench/step_compare.py --peer PATH/train_controlnet.py [--steps 4] [--proportion_empty_prompts 0]

1. Writes 64 Fill examples (64 px, imagefolder layout both programs read) and one `zeroconv init` ControlNet.
2. Runs the peer script, unmodified, for --steps optimizer steps in a subprocess that records what enters and
   leaves its step: the images given to the VAE, the posterior noise, the diffusion noise, the ControlNet's inputs
   (noisy latents, timesteps, text embeddings, condition), the loss, the clipped gradients, the weights after
   each update.
3. Runs `zeroconv train`'s own setup and loop (zeroconv.train.run.setup, zeroconv.train.loop.train_loop) with the
   same flags, fed the same samples (found in zeroconv's dataset by their pixels) and the same random draws, and
   records the same terms.
4. Prints, per step and term, the largest difference: where the two steps part, if they do.

Both programs start from the same ControlNet, so every difference is one of their steps'. Nothing of the peer is
copied here: it runs as published; the recorder wraps library functions both programs call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peer_env"))
sys.path.insert(0, str(HERE))


# ------------------------------------------------------------------------------------------------------------
# Recording: the same wrappers in both programs
# ------------------------------------------------------------------------------------------------------------

class StepRecorder:
    """Wraps the library calls a ControlNet training step makes and keeps their tensors, one dict per step.

    A step starts at the VAE encode (live latents) or at the first posterior draw (cached latents)."""

    def __init__(self):
        self.steps: list[dict] = []
        self.replay: list[dict] | None = None  # when set, draws are taken from here instead of the RNG

    def current(self) -> dict:
        return self.steps[-1]

    def new_step(self) -> dict:
        self.steps.append({})
        return self.steps[-1]

    def draw(self, key: str, make):
        if not self.steps:  # a draw outside the training step (data order, model set-up): not ours to record
            return make()
        step = self.current()
        if self.replay is not None:
            value = self.replay[len(self.steps) - 1][key].clone()
        else:
            value = make()
        step[key] = value.detach().clone()
        return value

    @contextmanager
    def installed(self):
        import diffusers.models.autoencoders.vae as vae_module
        import diffusers.utils.torch_utils as torch_utils
        import torch.nn.functional as F
        import torch.optim.optimizer as optimizer_hooks
        from diffusers import AutoencoderKL, ControlNetModel

        patched = [(vae_module, "randn_tensor"), (torch_utils, "randn_tensor"), (torch, "randn_like"),
                   (torch, "randn"), (torch, "randint"), (F, "mse_loss"), (AutoencoderKL, "encode"),
                   (ControlNetModel, "forward")]
        originals = [(obj, name, getattr(obj, name)) for obj, name in patched]
        o = {name: fn for obj, name, fn in originals}  # both randn_tensor entries are diffusers' one function
        recorder = self

        def posterior_noise(shape, generator=None, device=None, dtype=None, layout=None):
            if not recorder.steps or "posterior_noise" in recorder.current():
                recorder.new_step()  # cached latents: the step begins with this draw
            return recorder.draw("posterior_noise", lambda: o["randn_tensor"](
                shape, generator=generator, device=device, dtype=dtype))

        def randn_like(x, *args, **kwargs):
            return recorder.draw("noise", lambda: o["randn_like"](x, *args, **kwargs))

        def randn(*args, **kwargs):
            return recorder.draw("noise", lambda: o["randn"](*args, **kwargs))

        def randint(*args, **kwargs):
            return recorder.draw("timesteps_drawn", lambda: o["randint"](*args, **kwargs))

        def encode(vae, x, *args, **kwargs):
            recorder.new_step()["pixel_values"] = x.detach().clone()
            return o["encode"](vae, x, *args, **kwargs)

        def forward(net, sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs):
            if net.training:
                step = recorder.current()
                step.update(noisy_latents=sample.detach().clone(), timesteps=torch.as_tensor(timestep).clone(),
                            text_embeddings=encoder_hidden_states.detach().clone(),
                            condition=controlnet_cond.detach().clone())
            return o["forward"](net, sample, timestep, encoder_hidden_states, controlnet_cond, *args, **kwargs)

        def mse_loss(a, b, *args, **kwargs):
            loss = o["mse_loss"](a, b, *args, **kwargs)
            recorder.current()["loss"] = loss.detach().clone()
            return loss

        def flat(optimizer, attribute):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            return torch.cat([(p.grad if attribute == "grad" else p).detach().flatten() for p in params]).clone()

        def before_update(optimizer, args, kwargs):
            recorder.current()["grad"] = flat(optimizer, "grad")

        def after_update(optimizer, args, kwargs):
            recorder.current()["weights"] = flat(optimizer, "weights")

        vae_module.randn_tensor = torch_utils.randn_tensor = posterior_noise
        torch.randn_like, torch.randn, torch.randint, F.mse_loss = randn_like, randn, randint, mse_loss
        AutoencoderKL.encode, ControlNetModel.forward = encode, forward
        # global optimizer hooks: they see the update whatever wraps the optimizer (accelerate does)
        hooks = [optimizer_hooks.register_optimizer_step_pre_hook(before_update),
                 optimizer_hooks.register_optimizer_step_post_hook(after_update)]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            for obj, name, fn in originals:
                setattr(obj, name, fn)


# ------------------------------------------------------------------------------------------------------------
# The two programs
# ------------------------------------------------------------------------------------------------------------

def record_peer(script: str, flags: list[str], out: str) -> None:
    """(subprocess) the peer script as published, recorded."""
    from launch import isolate_torchvision, run_script

    isolate_torchvision()
    recorder = StepRecorder()
    with recorder.installed():
        run_script(script, flags)
    torch.save(recorder.steps, out)


def replay_zeroconv(flags: list[str], peer_steps: list[dict]) -> list[dict]:
    """zeroconv's setup and loop with the flags, on the peer's samples, with the peer's draws."""
    from zeroconv.config import TrainConfig, parse
    from zeroconv.data.dataset import collate
    from zeroconv.train import loop
    from zeroconv.train.run import setup

    # equal settings: the peer's uniform timesteps and live encoding (zeroconv's defaults are cubic and a cache)
    cfg = parse(TrainConfig, [*flags, "--timestep_sampling", "uniform", "--cache", "off"], prog="zeroconv train")
    t = setup(cfg)
    items = [t.dataset[i] for i in range(len(t.dataset))]
    pixels = torch.stack([item["pixel_values"] for item in items])

    def same_samples(step: dict) -> tuple[dict, float]:
        """zeroconv's batch holding the peer's samples, found by their target pixels."""
        chosen = [int((pixels - x).abs().flatten(1).amax(1).argmin()) for x in step["pixel_values"]]
        return collate([items[i] for i in chosen]), chosen

    batches = []
    for step in peer_steps:
        batch, chosen = same_samples(step)
        batches.append(batch)
    t.batches = iter(batches)
    recorder = StepRecorder()
    recorder.replay = [{"posterior_noise": s["posterior_noise"], "noise": s["noise"],
                        "timesteps_drawn": s["timesteps"]} for s in peer_steps]
    # one generator for the batch, as the peer draws: a whole-batch draw per term, which the replay then replaces
    # (zeroconv's own runs draw each sample from its (seed, step, index) generator: zeroconv.models.draws)
    per_sample_loss = loop.compute_loss
    loop.compute_loss = lambda trainer, batch, generators=None: per_sample_loss(
        trainer, batch, torch.Generator(trainer.device).manual_seed(0))
    try:
        with recorder.installed():
            loop.train_loop(t)
    finally:
        loop.compute_loss = per_sample_loss
    return recorder.steps


TERMS = [
    ("pixel_values", "images into the VAE"),
    ("condition", "condition into the ControlNet"),
    ("text_embeddings", "caption embeddings"),
    ("posterior_noise", "VAE posterior draw"),
    ("noise", "diffusion noise"),
    ("timesteps", "timesteps"),
    ("noisy_latents", "noisy latents"),
    ("loss", "loss"),
    ("grad", "clipped gradient"),
    ("weights", "weights after the update"),
]


def compare(peer: list[dict], ours: list[dict]) -> list[dict]:
    rows = []
    for k, (a, b) in enumerate(zip(peer, ours), start=1):
        row = {"step": k}
        for key, _ in TERMS:
            if key not in a or key not in b:
                row[key] = None
                continue
            x, y = a[key].double(), b[key].double()
            if x.shape != y.shape:
                # zeroconv may order a batch's samples differently: compare as sets where the term is per sample
                row[key] = f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
                continue
            row[key] = float((x - y).abs().max()) if x.numel() else 0.0
        row["loss_peer"], row["loss_zeroconv"] = float(a["loss"]), float(b["loss"])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'term (largest |peer - zeroconv|)':<34}" + "".join(f"{'step ' + str(r['step']):>12}" for r in rows))
    for key, label in TERMS:
        cells = []
        for r in rows:
            v = r[key]
            cells.append(f"{'-':>12}" if v is None else f"{v:>12}" if isinstance(v, str) else f"{v:>12.2e}")
        print(f"{label:<34}" + "".join(cells))
    print(f"{'loss, peer':<34}" + "".join(f"{r['loss_peer']:>12.6f}" for r in rows))
    print(f"{'loss, zeroconv':<34}" + "".join(f"{r['loss_zeroconv']:>12.6f}" for r in rows))


def make_inputs(work: Path, seed: int) -> tuple[Path, Path]:
    """64 Fill examples in the imagefolder layout and one `zeroconv init` ControlNet: learn_race's writers."""
    from learn_race import write_data, write_init

    data, _ = write_data(work, "fill", 64, 1, 64)
    return data, write_init(work, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", required=True, help="path to diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps compared (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and of both runs (default: 0)")
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                        help="passed to both; draws differ from 0 up, so compare at 0 (default: 0)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    if not Path(args.peer).is_file():
        parser.error(f"--peer {args.peer}: no such file (fetch examples/controlnet/train_controlnet.py from diffusers)")
    from zeroconv import toy_base

    work = Path(args.work or tempfile.mkdtemp(prefix="step-compare-"))
    data, init = make_inputs(work, args.seed)
    common = ["--pretrained_model_name_or_path", toy_base(), "--controlnet_model_name_or_path", str(init),
              "--train_data_dir", str(data), "--resolution", "64", "--train_batch_size", "16",
              "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--max_train_steps", str(args.steps),
              "--seed", str(args.seed), "--proportion_empty_prompts", str(args.proportion_empty_prompts),
              "--checkpointing_steps", str(args.steps + 1), "--report_to", "tensorboard"]
    recording = work / "peer_steps.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, __file__, RECORD_PEER, args.peer, str(recording), *common, "--output_dir",
                    str(work / "peer")], check=True, env=env, stdout=subprocess.DEVNULL)
    peer = torch.load(recording)
    ours = replay_zeroconv(common + ["--output_dir", str(work / "zeroconv")], peer)
    rows = compare(peer, ours)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


RECORD_PEER = "--record-peer"  # the subprocess's mode: RECORD_PEER SCRIPT OUT.pt FLAGS...

if __name__ == "__main__":
    if sys.argv[1:2] == [RECORD_PEER]:
        record_peer(sys.argv[2], sys.argv[4:], sys.argv[3])
    else:
        main()
