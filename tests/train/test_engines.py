"""DeepSpeed and FSDP (issue 16): the shipped accelerate configs are read by accelerate's own loader and launcher
into valid plugins; FSDP2 trains on 2 CPU processes (gloo) through accelerate's real prepare/save_state/load_state/
get_state_dict (tests/train/fsdp_on_cpu.py: a test-only switch, accelerate enables FSDP for GPUs only), with
--use_ema kept per shard, resumes exactly (the average included), validates the average and trains the model (and
the average) DDP trains; the sharded save's rank protocol keeps a checkpoint atomic; the flags the engines cannot
take are refused, naming the flag. DeepSpeed itself needs GPUs and is not run here."""

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from tests.train.test_distributed import launch_two
from tests.train.helpers import controlnet_weights, losses

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "accelerate").glob("*.yaml"))
FSDP_CONFIG = next(path for path in CONFIGS if path.name == "fsdp.yaml")


# ----------------------------------------------------------------------------------------------------------------
# The shipped configs
# ----------------------------------------------------------------------------------------------------------------

def launcher_view(config: Path) -> tuple:
    """What `accelerate launch --config_file config` makes of the file, as its own code does it: the config
    loader, the launch command's validation (as on an 8-GPU machine), and the environment the launcher gives each
    process, from which accelerate builds the engine's plugin."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    cluster = load_config_from_file(str(config))
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "zeroconv", "train"])
    with mock.patch("torch.cuda.device_count", return_value=8), mock.patch("torch.cuda.is_available",
                                                                            return_value=True):
        args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before the DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return cluster, args, env


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_accelerate_config_loads_and_validates(config, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    text = config.read_text()
    assert f"accelerate launch --config_file configs/accelerate/{config.name} " in text  # the header's command
    cluster, args, env = launcher_view(config)
    assert cluster.num_processes == args.num_processes == 8 and cluster.mixed_precision == "bf16"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if config.stem == "ddp":
        assert cluster.distributed_type == DistributedType.MULTI_GPU and not args.use_fsdp and not args.use_deepspeed
    elif config.stem == "fsdp":
        from torch.distributed.fsdp import StateDictType
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = FullyShardedDataParallelPlugin()  # built from the launcher's FSDP_* variables, as in Accelerator
        assert cluster.distributed_type == DistributedType.FSDP and args.use_fsdp
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
        assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
        assert plugin.transformer_cls_names_to_wrap is None  # left to zeroconv: the blocks of the ControlNet built
    else:
        stage = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}[config.stem]
        plugin = DeepSpeedPlugin()  # built from the launcher's ACCELERATE_DEEPSPEED_* variables, as in Accelerator
        assert cluster.distributed_type == DistributedType.DEEPSPEED and args.use_deepspeed
        zero = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage == zero["stage"] == stage
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
        # ZeRO-3 must gather the weights for validation, checkpoint-N/controlnet and the final model
        assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
        assert plugin.gradient_accumulation_steps == 1


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 on 2 CPU processes
# ----------------------------------------------------------------------------------------------------------------

def launch_fsdp(base, data, out, steps, *extra, env=None):
    return launch_two(base, data, out, steps, *extra, env=env, config=FSDP_CONFIG, module="tests.train.fsdp_on_cpu")


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_trains_checkpoints_resumes_exactly_and_matches_ddp(tiny_base, tiny_dataset, tmp_path, ddp_four_steps):
    """With --use_ema, as the DDP run it is compared with: the average is kept of each rank's shard."""
    from safetensors.torch import load_file

    ddp, straight, resumed = ddp_four_steps, tmp_path / "straight", tmp_path / "resumed"
    validation_image = next((Path(tiny_dataset) / "conditioning").rglob("*.png"))
    validation = ("--validation_image", str(validation_image), "--validation_prompt", "a square",
                  "--validation_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "2")
    launch_fsdp(tiny_base, tiny_dataset, straight, 4, "--use_ema", *validation,
                env={"ZEROCONV_TEST_RECORD_VALIDATION": "1"})  # the weights each validation samples, saved
    launch_fsdp(tiny_base, tiny_dataset, resumed, 2, "--use_ema")
    launch_fsdp(tiny_base, tiny_dataset, resumed, 4, "--use_ema", "--resume_from_checkpoint", "latest")

    checkpoint = resumed / "checkpoint-2"
    assert (checkpoint / "COMPLETE").is_file() and not list(resumed.glob(".checkpoint-*"))
    engine = checkpoint / "engine"
    for part in ("pytorch_model_fsdp_0", "optimizer_0", "ema"):  # DCP: one file of each rank's shard
        assert sorted(p.name for p in (engine / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    assert sorted(p.name for p in engine.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert json.loads((checkpoint / "engine.json").read_text()) == {"distributed_type": "FSDP", "num_processes": 2}
    assert json.loads((checkpoint / "controlnet_ema" / "ema_state.json").read_text())["optimization_step"] == 2

    # resumed == uninterrupted, to the bit: the average (the final export and the checkpoint's gathered copy), the
    # trained weights (the same two) and the losses
    for folder in (".", "without_ema", "checkpoint-4/controlnet", "checkpoint-4/controlnet_ema"):
        assert equal_weights(controlnet_weights(straight / folder), controlnet_weights(resumed / folder)), folder
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    average, trained = controlnet_weights(straight), controlnet_weights(straight / "without_ema")
    assert equal_weights(average, controlnet_weights(straight / "checkpoint-4/controlnet_ema"))
    assert equal_weights(trained, controlnet_weights(straight / "checkpoint-4/controlnet"))
    assert any(not torch.equal(average[k], trained[k]) for k in trained)  # the average is not the weights' copy

    # validation sampled the gathered average: a grid at each validation step, the average of that step in the
    # ControlNet it was given (not the trained weights), and training unchanged by it (resumed had no validation)
    assert sorted(p.name for p in (straight / "validation").glob("*.png")) == ["step-000002.png", "step-000004.png"]
    for step in (2, 4):
        validated = load_file(straight / "validated" / f"step-{step}.safetensors")
        assert equal_weights(validated, controlnet_weights(straight / f"checkpoint-{step}/controlnet_ema")), step
        assert not equal_weights(validated, controlnet_weights(straight / f"checkpoint-{step}/controlnet")), step

    # FSDP trains the model DDP trains (the same averaged gradient, sharded), and keeps the average DDP keeps
    start = controlnet_weights(checkpoint)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # it moved from step 2 to 4: not trivial
    for ours, reference in ((trained, controlnet_weights(ddp / "without_ema")), (average, controlnet_weights(ddp))):
        assert ours.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, key=key: f"{key}: {m}")
    assert losses(ddp).keys() == losses(straight).keys()
    assert all(losses(ddp)[s] == pytest.approx(losses(straight)[s], rel=1e-5) for s in losses(ddp))


# ----------------------------------------------------------------------------------------------------------------
# The rank protocol of a sharded save, with a fake accelerator of 2 ranks in 2 threads
# ----------------------------------------------------------------------------------------------------------------

class FakeRank:
    """One rank of a 2-process accelerator: wait_for_everyone is a shared barrier; save_state writes this rank's
    shard and records the folder it was given."""

    distributed_type = SimpleNamespace(name="FSDP")
    num_processes = 2

    def __init__(self, rank: int, barrier: threading.Barrier, folders: list):
        self.process_index, self.is_main_process = rank, rank == 0
        self.barrier, self.folders = barrier, folders

    def wait_for_everyone(self):
        self.barrier.wait(timeout=20)

    def save_state(self, folder):
        self.folders.append(folder)
        time.sleep(0.3 * self.process_index)  # rank 1 the slower: the main process must wait for its shard
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"shard_{self.process_index}.distcp").write_text("shard")


class FakeController:
    def save_pretrained(self, folder, safe_serialization=True):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_text("weights")


def save_on_two_ranks(out: Path, step: int, total_limit=None) -> list:
    """save_sharded_checkpoint on both ranks at once; returns (rank, result or exception) and the folders."""
    from zeroconv.train.checkpoint import TrainerState, save_sharded_checkpoint

    barrier, folders, results = threading.Barrier(2), [], []
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1)

    def rank(index):
        try:
            results.append((index, save_sharded_checkpoint(
                FakeRank(index, barrier, folders), out, step, controlnet=FakeController() if index == 0 else None,
                lr_scheduler=scheduler, state=TrainerState(global_step=step), identity={}, config={},
                total_limit=total_limit)))
        except Exception as exc:  # noqa: BLE001 - the test reads it
            results.append((index, exc))
            barrier.abort()  # a dead process's peers stop waiting at the next collective (NCCL's, gloo's timeout)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return sorted(results, key=lambda r: r[0]), folders


def test_every_rank_saves_into_one_folder_and_main_marks_it_complete(tmp_path):
    from zeroconv.train.checkpoint import COMPLETE, find_resume_checkpoint

    results, folders = save_on_two_ranks(tmp_path, 2)
    final = tmp_path / "checkpoint-2"
    assert [r for _, r in results] == [final, final]  # every rank returns once the checkpoint is in place
    assert len(folders) == 2 and len(set(folders)) == 1  # one temporary folder, named the same on both ranks
    assert Path(folders[0]).parent.name == ".checkpoint-2.tmp-sharded"
    assert sorted(p.name for p in (final / "engine").iterdir()) == ["shard_0.distcp", "shard_1.distcp"]
    assert (final / COMPLETE).is_file() and (final / "controlnet").is_dir()
    assert not list(tmp_path.glob(".checkpoint-*"))
    assert find_resume_checkpoint(tmp_path, "latest") == final


def test_a_sharded_save_killed_before_complete_leaves_nothing_latest_picks(tmp_path, monkeypatch):
    from zeroconv.train import checkpoint
    from zeroconv.train.checkpoint import find_resume_checkpoint

    save_on_two_ranks(tmp_path, 2)

    def killed():
        raise RuntimeError("killed while saving")  # the main process dies after every shard, before COMPLETE

    monkeypatch.setattr(checkpoint, "_fault_injection_pause", killed)
    results, _ = save_on_two_ranks(tmp_path, 4)
    assert isinstance(results[0][1], RuntimeError) and isinstance(results[1][1], threading.BrokenBarrierError)
    assert (tmp_path / ".checkpoint-4.tmp-sharded" / "engine" / "shard_1.distcp").is_file()  # the shards were there
    assert not (tmp_path / "checkpoint-4").exists()
    assert find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"

    monkeypatch.undo()
    save_on_two_ranks(tmp_path, 6, total_limit=1)  # the next good save prunes the old one and the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]


# ----------------------------------------------------------------------------------------------------------------
# What the engines refuse, and resuming under another engine
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine, zero_stage", [("DEEPSPEED", 2), ("DEEPSPEED", 3), ("FSDP", None)])
@pytest.mark.parametrize("flag, overrides", [("--use_ema", dict(use_ema=True)),
                                             ("--sd_locked false", dict(sd_locked=False)),
                                             ("--gradient_accumulation_steps 2", dict(gradient_accumulation_steps=2))])
def test_flags_the_engines_cannot_take_are_refused_by_name(engine, zero_stage, flag, overrides):
    from zeroconv.errors import UserError
    from zeroconv.train.engines import check_engine_flags

    cfg = SimpleNamespace(**{**dict(use_ema=False, sd_locked=True, gradient_accumulation_steps=1), **overrides})
    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name=engine),
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))
    taken = ((engine == "FSDP" and flag.startswith("--gradient_accumulation_steps"))  # zeroconv's no_sync, as DDP
             or (flag == "--use_ema" and zero_stage != 3))  # FSDP: the average per shard; ZeRO-2: weights whole
    if taken:
        check_engine_flags(cfg, accelerator)
        return
    with pytest.raises(UserError, match=f"^{flag}: not supported under ") as refused:
        check_engine_flags(cfg, accelerator)
    if flag == "--use_ema":
        assert "under DeepSpeed ZeRO-3" in str(refused.value) and "ZeRO-2 and FSDP" in str(refused.value)
    check_engine_flags(cfg, SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_GPU")))  # DDP takes all


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(tmp_path):
    from zeroconv.errors import UserError
    from zeroconv.train.checkpoint import check_engine

    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    plain.mkdir()
    (sharded / "engine").mkdir(parents=True)
    (sharded / "engine.json").write_text(json.dumps({"distributed_type": "DEEPSPEED", "num_processes": 8}))

    def launch(kind, processes=8):
        return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), num_processes=processes)

    check_engine(plain, launch("MULTI_GPU"), None)
    check_engine(sharded, launch("DEEPSPEED"), "DeepSpeed")
    with pytest.raises(UserError, match="written by one process or DDP, and this launch uses FSDP"):
        check_engine(plain, launch("FSDP"), "FSDP")
    with pytest.raises(UserError, match="written under DEEPSPEED, and this launch uses MULTI_GPU"):
        check_engine(sharded, launch("MULTI_GPU"), None)
    with pytest.raises(UserError, match="written under DEEPSPEED, and this launch uses FSDP"):
        check_engine(sharded, launch("FSDP"), "FSDP")
    with pytest.raises(UserError, match="resume with --num_processes 8"):
        check_engine(sharded, launch("DEEPSPEED", 4), "DeepSpeed")


def test_fsdp_units_are_the_blocks_of_the_controlnet_built(tiny_base):
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from zeroconv.models.base import load_base
    from zeroconv.train.engines import FSDP_BLOCKS, configure_engine

    base = load_base(str(tiny_base))
    controlnet = base.family.build_controlnet(base, 3)
    present = {type(module).__name__ for module in controlnet.modules()}

    def fsdp(names=None):
        plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=names)
        return SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"), state=SimpleNamespace(fsdp_plugin=plugin))

    accelerator = fsdp()
    configure_engine(None, accelerator, controlnet)
    named = accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap
    assert named and set(named) <= present and set(named) == present & set(FSDP_BLOCKS)
    accelerator = fsdp(["Transformer2DModel"])  # the config's fsdp_transformer_layer_cls_to_wrap wins
    configure_engine(None, accelerator, controlnet)
    assert accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap == ["Transformer2DModel"]
