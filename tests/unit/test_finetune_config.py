"""The finetune config composes for every preset; bad values name their key before Ray (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from medray.config import CONF_DIR, register_schemas
from medray.jobs.finetune import FinetuneJob, register
from medray.platform.errors import ConfigError

TASKS = sorted(p.stem for p in Path(CONF_DIR, "task").glob("*.yaml"))
TRAINS = sorted(p.stem for p in Path(CONF_DIR, "train").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))
TASK_ARGS = {
    "binary": ["task.labels=[lesion]"],
    "multilabel": ["task.labels=[lesion,effusion]"],
    "multiclass": ["task.column=finding", "task.labels=[none,lesion,effusion,both]"],
    "regression": ["task.labels=[severity]"],
}


@pytest.fixture
def manifest(tmp_path):
    """A labelled manifest: 40 patients x 2 images, findings alternating, site/sex/age columns."""
    rows = []
    for p in range(40):
        for j in range(2):
            lesion, effusion = (p + j) % 2, (p // 2 + j) % 2
            rows.append(
                {
                    "uri": f"s3://b/{p}/{j}.dcm",
                    "patient": f"P{p}",
                    "lesion": lesion,
                    "effusion": effusion,
                    "finding": ["none", "lesion", "effusion", "both"][lesion + 2 * effusion],
                    "severity": float(p % 5),
                    "site": "AB"[p % 2],
                    "sex": "MF"[p % 2],
                    "age": 30 + p,
                    "fold": "val" if p % 4 == 0 else "train",
                }
            )
    path = tmp_path / "labels.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def compose_ft(tmp_path, manifest):
    register_schemas()
    register()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose(
                "finetune",
                overrides=[
                    f"data.train={manifest}",
                    f"output={tmp_path / 'out'}",
                    "encoder.checkpoint=/models/x",
                    "data.group_by=patient",
                    *overrides,
                ],
            )

    return _compose


def test_presets_exist():
    assert set(TASKS) >= {"binary", "multilabel", "multiclass", "regression"}
    assert set(TRAINS) == {"full", "lora", "linear_probe"}
    assert EXPERIMENTS


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("train", TRAINS)
def test_every_task_and_train_preset_composes_and_validates(compose_ft, task, train):
    job = FinetuneJob(compose_ft(f"task={task}", f"train={train}", *TASK_ARGS[task]))
    assert job.cfg.task.type == task and job.cfg.train.strategy == train
    assert job.counts["train"]["usable"] > 0 and job.counts["val"]["usable"] > 0
    assert job.example_spec.n_outputs == len(job.example_spec.labels)


def test_experiments_compose(compose_ft):
    for name in EXPERIMENTS:
        cfg = compose_ft(f"experiment={name}")
        assert cfg.task.labels and cfg.train.strategy in ("full", "lora", "linear_probe")
    job = FinetuneJob(compose_ft("experiment=cxr_lesion_tiny"))
    assert job.cfg.task.type == "multilabel" and job.example_spec.subgroups == ("sex", "age_band", "site")
    with pytest.raises(ConfigError, match="scaling.use_gpu"):  # asks for GPUs; this machine has none
        import torch

        if torch.cuda.is_available():
            pytest.skip("GPU present")
        FinetuneJob(compose_ft("experiment=cxr_rad_dino_lora", "encoder.checkpoint=/models/x"))


def test_split_modes_and_counts(compose_ft):
    job = FinetuneJob(compose_ft("task.labels=[lesion]", "data.split_column=fold"))
    assert job.plan.mode == "column" and job.counts["val"]["rows"] == 20
    job = FinetuneJob(compose_ft("task.labels=[lesion]", "data.val_fraction=0.3", "data.test_fraction=0.1"))
    c = job.counts
    assert job.plan.mode == "group" and c["train"]["rows"] + c["val"]["rows"] + c["test"]["rows"] == 80
    assert c["val"]["rows"] % 2 == 0  # both images of a patient go together
    job = FinetuneJob(compose_ft("task.labels=[lesion]", "data.group_by=patient_key"))
    assert job.plan.mode == "patient_key" and job.counts is None  # counted after the header pass


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["task.type=ordinal", "task.labels=[lesion]"], "task.type"),
        (["task.labels=[]"], "task.labels"),
        (["task.labels=[lesion,effusion]"], "task.labels"),  # binary takes one label
        (["task.labels=[pneumothorax]"], "task.labels"),  # unknown column
        (["task=multiclass", "task.labels=[a,b]"], "task.column"),
        (["task=multiclass", "task.column=nope", "task.labels=[a,b]"], "task.column"),
        (["task=multiclass", "task.column=finding", "task.labels=[none,lesion]"], "task.labels"),  # values not classes
        (["task.labels=[finding]"], "task.labels"),  # not 0/1
        (["task.labels=[lesion]", "task.column=finding"], "task.column"),
        (["task.labels=[lesion]", "deepspeed.stage=5"], "deepspeed.stage"),
        (["task.labels=[lesion]", "deepspeed.stage=2", "deepspeed.offload_params=true"], "deepspeed.offload_params"),
        (
            ["task.labels=[lesion]", "deepspeed.stage=0", "deepspeed.offload_optimizer=true"],
            "deepspeed.offload_optimizer",
        ),
        (["task.labels=[lesion]", "train.strategy=adapters"], "train.strategy"),
        (["task.labels=[lesion]", "train.precision=bf16"], "train.precision"),
        (["task.labels=[lesion]", "train.schedule=step"], "train.schedule"),
        (["task.labels=[lesion]", "train.epochs=0"], "train.epochs"),
        (["task.labels=[lesion]", "train.lr=0"], "train.lr"),
        (["task.labels=[lesion]", "train.warmup_fraction=1.5"], "train.warmup_fraction"),
        (["task.labels=[lesion]", "train=lora", "train.lora.r=0"], "train.lora.r"),
        (["task.labels=[lesion]", "+train.augment.DX.rotate=0.5"], "train.augment.DX.rotate"),
        (["task.labels=[lesion]", "scaling.num_workers=0"], "scaling.num_workers"),
        (["task.labels=[lesion]", "eval.subgroups=[ethnicity]"], "eval.subgroups"),
        (["task.labels=[lesion]", "data.group_by=family"], "data.group_by"),
        (["task.labels=[lesion]", "data.split_column=nope"], "data.split_column"),
        (["task.labels=[lesion]", "data.val_fraction=0"], "data.val_fraction"),
        (["task.labels=[lesion]", "data.val_fraction=0.7", "data.test_fraction=0.4"], "data.val_fraction"),
        (["task.labels=[lesion]", "data.cache=sometimes"], "data.cache"),
        (["task.labels=[lesion]", "encoder=hf_image", "encoder.checkpoint=???"], "encoder.checkpoint"),
        (["task.labels=[lesion]", "data.train=/nowhere/labels.parquet"], "data.train"),
        (["task.labels=[lesion]", "encoder=hf_text"], "train.strategy"),  # text: a head on pooled embeddings only
    ],
)
def test_bad_values_name_the_key(compose_ft, overrides, key):
    with pytest.raises(ConfigError) as err:
        FinetuneJob(compose_ft(*overrides))
    assert err.value.key == key, str(err.value)


def test_no_positives_in_a_split_names_the_label(compose_ft, tmp_path):
    rows = pq.read_table(compose_ft("task.labels=[lesion]").data.train).to_pylist()
    for r in rows:
        if r["fold"] == "val":
            r["lesion"] = 0
    path = tmp_path / "nopos.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ConfigError, match="no positive examples in the val split") as err:
        FinetuneJob(compose_ft("task.labels=[lesion]", f"data.train={path}", "data.split_column=fold"))
    assert err.value.key == "task.labels" and "'lesion'" in str(err.value)


@pytest.mark.parametrize(("positives", "message"), [(0, "has 0 positive"), (1, "has 1 positive")])
def test_patient_split_refuses_too_few_positives_before_ray(compose_ft, tmp_path, positives, message):
    """data.group_by=patient_key splits on Ray (DICOM headers); what the manifest answers is checked first."""
    rows = pq.read_table(compose_ft("task.labels=[lesion]").data.train).to_pylist()
    seen = 0
    for r in rows:
        if r["lesion"]:
            seen += 1
            r["lesion"] = 1 if seen <= positives else 0
    path = tmp_path / "few.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ConfigError, match=message) as err:
        FinetuneJob(compose_ft("task.labels=[lesion]", f"data.train={path}", "data.group_by=patient_key"))
    assert err.value.key == "task.labels" and "'lesion'" in str(err.value)
    import sys

    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_an_existing_run_needs_resume(compose_ft, tmp_path):
    snap = tmp_path / "out" / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    snap.parent.mkdir(parents=True)
    snap.write_text("{}")
    with pytest.raises(ConfigError) as err:
        FinetuneJob(compose_ft("task.labels=[lesion]"))
    assert err.value.key == "resume"
    assert FinetuneJob(compose_ft("task.labels=[lesion]", "resume=true")).cfg.resume


def test_job_module_imports_no_torch_or_ray():
    import subprocess
    import sys

    code = "import sys, medray.jobs.finetune; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


# --------------------------------------------------------------------------
# DeepSpeed config, LR schedule, checkpoint completeness (torch, no Ray)
# --------------------------------------------------------------------------
def test_deepspeed_config_from_settings():
    from medray.jobs.finetune.model import deepspeed_config

    cfg = deepspeed_config(
        stage=3,
        micro_batch=8,
        grad_accum=4,
        clip=1.0,
        precision="fp32",
        offload_optimizer=True,
        offload_params=True,
        extra={"zero_optimization": {"reduce_bucket_size": 1000}},
    )
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "cpu"} and zero["reduce_bucket_size"] == 1000
    assert zero["offload_param"] == {"device": "cpu"} and cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.0 and "bf16" not in cfg and "optimizer" not in cfg
    assert deepspeed_config(
        stage=2,
        micro_batch=1,
        grad_accum=1,
        clip=None,
        precision="bf16",
        offload_optimizer=False,
        offload_params=False,
        extra={},
    )["bf16"] == {"enabled": True}


def test_lr_schedule_warms_up_then_decays():
    from medray.jobs.finetune.model import lr_factor

    f = [lr_factor(s, total=100, warmup=10, schedule="cosine") for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[100] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, total=100, warmup=10, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(80, total=100, warmup=0, schedule="constant") == 1.0


def test_torn_checkpoints_are_refused(tmp_path):
    from medray.jobs.finetune.loop import STATE_FILE, check_complete

    with pytest.raises(RuntimeError, match="incomplete"):
        check_complete(str(tmp_path), 2)  # no state file: the save never finished
    tag = tmp_path / "epoch0001"
    tag.mkdir()
    (tmp_path / STATE_FILE).write_text(json.dumps({"tag": "epoch0001", "world_size": 2, "stage": 2, "epoch": 1}))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="incomplete"):  # rank 1's shard is missing
        check_complete(str(tmp_path), 2)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert check_complete(str(tmp_path), 2)["epoch"] == 1
    with pytest.raises(RuntimeError, match="same scaling.num_workers"):
        check_complete(str(tmp_path), 4)


def test_augmentations_keep_shape_and_follow_the_modality():
    import torch

    from medray.jobs.finetune.model import augment_batch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, ["DX", "CT"], {"DX": {"hflip": 1.0}}, g)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
    out = augment_batch(x, ["DX", "CT"], {"default": {"brightness": 0.1, "noise": 0.01, "shift": 0.25}}, g)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert augment_batch(x, ["DX", "CT"], {}, g) is x
