#!/usr/bin/env python
"""Time the MAML++ authors' reference code (AntreasAntoniou/HowToTrainYourMAMLPytorch)
on synthetic task batches, on CPU, one fresh process per (preset, phase).

Driver (waits for a quiet machine, holds /tmp/refbench.running, runs all children):
    python time_reference.py --all --out RESULT.json [--smoke]
Child (one preset, one phase; normally started by the driver):
    python time_reference.py --child --preset omniglot-5w1s --phase train --iters 8 --child-out X.json

The reference model is built exactly as its train_maml_system.py does:
    args, device = utils.parser_utils.get_args()   (with --name_of_args_json_file <config>)
    MAMLFewShotClassifier(args=args, device=device, im_shape=(2, C, H, W))
and driven through its public run_train_iter / run_validation_iter.

The reference code itself is not in this repository: copy the files SOURCES lists (from the
reference repository at the commits given, under their local names) into a folder and point
MAMLPP_REFERENCE_DIR at it. benchmarks/vs_reference.py drives the children of this script.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# the folder holding the reference code's files (SOURCES, under their local names)
HERE = os.environ.get("MAMLPP_REFERENCE_DIR", os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    # reference repo experiment_config/*.json used for each preset
    "omniglot-5w1s": {
        "config": "configs/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json",
        "iters": 8,
        "val_tasks": 20,
    },
    "mini-imagenet-5w5s": {
        "config": "configs/mini-imagenet_maml++-mini-imagenet_5_2_0.01_48_5_0.json",
        "iters": 4,
        "val_tasks": 10,
    },
    "omniglot-5w5s": {
        "config": "configs/omniglot_maml++-omniglot_5_8_0.1_64_5_0.json",
        "iters": 4,
        "val_tasks": 20,
    },
    "omniglot-20w1s": {
        "config": "configs/omniglot_maml++-omniglot_1_8_0.1_64_20_0.json",
        "iters": 3,
        "val_tasks": 16,
    },
    "omniglot-20w5s": {
        "config": "configs/omniglot_maml++-omniglot_5_8_0.1_64_20_0.json",
        "iters": 2,
        "val_tasks": 8,
    },
    "mini-imagenet-5w1s": {
        "config": "configs/mini-imagenet_maml++-mini-imagenet_1_2_0.01_48_5_0.json",
        "iters": 3,
        "val_tasks": 10,
    },
}

REPO = "AntreasAntoniou/HowToTrainYourMAMLPytorch"
SOURCES = [
    # (local copy, path in reference repo, commit of the stored version read, read_file id)
    ("few_shot_learning_system.py", "few_shot_learning_system.py",
     "df8a94c65a4f7c8386c71d0080f26b27e179089d", "7581215974"),
    ("meta_neural_network_architectures.py", "meta_neural_network_architectures.py",
     "2ba93144db9b3415ef203aacc9181234e6360fb9", "7081420315"),
    ("inner_loop_optimizers.py", "inner_loop_optimizers.py",
     "bf5643701d3fe61ee447a17832283890c080c1ea", "3019216570"),
    ("utils/parser_utils.py", "utils/parser_utils.py",
     "2ba93144db9b3415ef203aacc9181234e6360fb9", "6791121983"),
    ("configs/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json",
     "experiment_config/omniglot_maml++-omniglot_1_8_0.1_64_5_0.json",
     "0cbec876a64d5b0a1b720950c9d919f9751091ab", "5754839743"),
    ("configs/mini-imagenet_maml++-mini-imagenet_5_2_0.01_48_5_0.json",
     "experiment_config/mini-imagenet_maml++-mini-imagenet_5_2_0.01_48_5_0.json",
     "0cbec876a64d5b0a1b720950c9d919f9751091ab", "5885085218"),
]
# the other four presets' configs, same commit (read by repo, path and commit)
SOURCES += [
    (f"configs/{name}", f"experiment_config/{name}", "0cbec876a64d5b0a1b720950c9d919f9751091ab", None)
    for name in ("omniglot_maml++-omniglot_5_8_0.1_64_5_0.json",
                 "omniglot_maml++-omniglot_1_8_0.1_64_20_0.json",
                 "omniglot_maml++-omniglot_5_8_0.1_64_20_0.json",
                 "mini-imagenet_maml++-mini-imagenet_1_2_0.01_48_5_0.json")
]

EDITS = [
    "None to the reference code: few_shot_learning_system.py, meta_neural_network_architectures.py, "
    "inner_loop_optimizers.py, utils/parser_utils.py and both experiment_config JSONs are verbatim copies "
    "(character counts checked against the stored files). They already select CPU when "
    "torch.cuda.is_available() is False (parser_utils.get_args -> torch.device('cpu'); "
    "MAMLFewShotClassifier.__init__ sets self.device = torch.device('cpu') and num_devices = 1) and contain "
    "no .cuda() calls; they run unmodified on torch 2.13 CPU.",
    "Deprecated APIs left as they are (they only warn on torch 2.13 and compute the same): "
    "scheduler.step(epoch=epoch) and scheduler.get_lr() in run_train_iter; "
    "'is not \"None\"' string comparison in parser_utils (SyntaxWarning).",
    "Harness-side only (not edits): args come from the reference's own utils.parser_utils.get_args() with "
    "sys.argv = [--name_of_args_json_file <config>] and DATASET_DIR set to a dummy dir (only used to build "
    "dataset_path strings); the data loaders (data.py) are not used - synthetic torch tensors with the "
    "loader's layout/dtypes are passed instead; train_maml_system.py's im_shape=(2, C, H, W) is reproduced.",
]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def loadavg1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# ----------------------------------------------------------------------------------------------
# child
# ----------------------------------------------------------------------------------------------

def build_reference(config_path):
    sys.path.insert(0, HERE)
    os.environ.setdefault("DATASET_DIR", os.path.join(HERE, "no_datasets"))
    saved_argv = sys.argv
    sys.argv = ["train_maml_system.py", "--name_of_args_json_file", config_path]
    try:
        from utils.parser_utils import get_args
        args, device = get_args()
    finally:
        sys.argv = saved_argv
    from few_shot_learning_system import MAMLFewShotClassifier
    model = MAMLFewShotClassifier(args=args, device=device,
                                  im_shape=(2, args.image_channels, args.image_height, args.image_width))
    return args, device, model


def make_batch(args, n_tasks, gen):
    import torch
    w, s, t = args.num_classes_per_set, args.num_samples_per_class, args.num_target_samples
    c, h, wd = args.image_channels, args.image_height, args.image_width
    xs = torch.rand(n_tasks, w, s, c, h, wd, generator=gen)
    xt = torch.rand(n_tasks, w, t, c, h, wd, generator=gen)
    labels = torch.arange(w, dtype=torch.long).view(1, w, 1)
    ys = labels.expand(n_tasks, w, s).contiguous()
    yt = labels.expand(n_tasks, w, t).contiguous()
    return xs, xt, ys, yt


def run_child(opts):
    import torch
    cfg = os.path.join(HERE, PRESETS[opts.preset]["config"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_build = time.perf_counter()
    # the reference prints a lot while building; send it to stderr so stdout stays clean
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        args, device, model = build_reference(cfg)
    finally:
        sys.stdout = real_stdout
    build_s = time.perf_counter() - t_build
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gen = torch.Generator().manual_seed(1234)
    epoch = 0
    out = {
        "preset": opts.preset,
        "phase": opts.phase,
        "config": PRESETS[opts.preset]["config"],
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "model_device": str(model.device),
        "settings": {
            "batch_size": args.batch_size,
            "ways": args.num_classes_per_set,
            "shots": args.num_samples_per_class,
            "targets_per_class": args.num_target_samples,
            "image": [args.image_channels, args.image_height, args.image_width],
            "cnn_num_filters": args.cnn_num_filters,
            "num_stages": args.num_stages,
            "max_pooling": args.max_pooling,
            "per_step_bn_statistics": args.per_step_bn_statistics,
            "learnable_per_layer_per_step_inner_loop_learning_rate":
                args.learnable_per_layer_per_step_inner_loop_learning_rate,
            "number_of_training_steps_per_iter": args.number_of_training_steps_per_iter,
            "number_of_evaluation_steps_per_iter": args.number_of_evaluation_steps_per_iter,
            "second_order": args.second_order,
            "first_order_to_second_order_epoch": args.first_order_to_second_order_epoch,
            "use_multi_step_loss_optimization": args.use_multi_step_loss_optimization,
            "multi_step_loss_num_epochs": args.multi_step_loss_num_epochs,
            "task_learning_rate_used_by_code": args.task_learning_rate,
            "init_inner_loop_learning_rate_in_config": getattr(args, "init_inner_loop_learning_rate", None),
            "seed": args.seed,
        },
        "build_s": build_s,
        "epoch": epoch,
        "n_params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if opts.phase == "train":
        second_order_active = bool(args.second_order and epoch > args.first_order_to_second_order_epoch)
        msl_active = bool(args.use_multi_step_loss_optimization and epoch < args.multi_step_loss_num_epochs)
        assert second_order_active and msl_active, (second_order_active, msl_active)
        out["second_order_active"] = second_order_active
        out["msl_active"] = msl_active
        out["importance_vector_epoch0"] = [float(v) for v in model.get_per_step_loss_importance_vector()]
        samples, losses = [], []
        for i in range(1 + opts.iters):
            batch = make_batch(args, args.batch_size, gen)
            t0 = time.perf_counter()
            l, _ = model.run_train_iter(data_batch=batch, epoch=epoch)
            dt = time.perf_counter() - t0
            losses.append(float(l["loss"]))
            if i == 0:
                out["warmup_s"] = dt
            else:
                samples.append(dt)
            print(f"[{opts.preset} train] iter {i}{' (warm-up)' if i == 0 else ''}: {dt:.3f} s, "
                  f"loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        out["s_per_iter_samples"] = samples
        out["s_per_iter_median"] = statistics.median(samples)
        out["iterations_timed"] = len(samples)
        out["tasks_per_iter"] = args.batch_size
        out["losses"] = losses
    else:
        # warm-up: one batch, not timed
        batch = make_batch(args, args.batch_size, gen)
        t0 = time.perf_counter()
        model.run_validation_iter(data_batch=batch)
        out["warmup_s"] = time.perf_counter() - t0
        remaining = opts.val_tasks
        call_samples = []
        total = 0.0
        accs = []
        while remaining > 0:
            n = min(args.batch_size, remaining)
            batch = make_batch(args, n, gen)
            t0 = time.perf_counter()
            l, _ = model.run_validation_iter(data_batch=batch)
            dt = time.perf_counter() - t0
            total += dt
            accs.append(float(l["accuracy"]))
            call_samples.append({"tasks": n, "s": dt})
            print(f"[{opts.preset} val] {n} tasks: {dt:.3f} s", file=sys.stderr, flush=True)
            remaining -= n
        out["val_tasks_timed"] = opts.val_tasks
        out["val_calls"] = call_samples
        out["val_total_s"] = total
        out["s_per_task"] = total / opts.val_tasks
        out["val_accuracy_mean"] = statistics.mean(accs)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out["ru_maxrss_kib_at_start"] = rss0
    out["ru_maxrss_kib_after_build"] = rss_built
    out["ru_maxrss_kib"] = rss_peak
    out["peak_rss_gib"] = rss_peak / 1024 ** 2
    with open(opts.child_out, "w") as f:
        json.dump(out, f, indent=2)


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------

LEAD_LOCK = "/tmp/mamlpp-bench.running"
MY_LOCK = "/tmp/refbench.running"


def wait_for_quiet(max_load=0.6, poll=20):
    waited = 0
    while True:
        lead = os.path.exists(LEAD_LOCK)
        la = loadavg1()
        if not lead and la < max_load:
            return waited
        print(f"waiting: lead lock={'present' if lead else 'absent'}, load1={la:.2f}", flush=True)
        time.sleep(poll)
        waited += poll


def run_driver(opts):
    plan = []
    for preset, p in PRESETS.items():
        iters = 1 if opts.smoke else p["iters"]
        vt = 1 if opts.smoke else p["val_tasks"]
        plan.append((preset, "train", iters, vt))
        plan.append((preset, "val", iters, vt))
    logdir = os.path.join(HERE, "logs" + ("-smoke" if opts.smoke else ""))
    os.makedirs(logdir, exist_ok=True)
    waited = wait_for_quiet()
    load_at_start = loadavg1()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    children = {}
    with open(MY_LOCK, "w") as f:
        f.write(f"{os.getpid()} reference-code timing, started {started}\n")
    try:
        for preset, phase, iters, vt in plan:
            child_out = os.path.join(logdir, f"{preset}-{phase}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--preset", preset, "--phase", phase,
                   "--iters", str(iters), "--val-tasks", str(vt), "--child-out", child_out]
            print("running:", " ".join(cmd), flush=True)
            with open(os.path.join(logdir, f"{preset}-{phase}.log"), "w") as log:
                r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
            if r.returncode != 0:
                raise SystemExit(f"child {preset}/{phase} failed rc={r.returncode}; see {logdir}")
            with open(child_out) as f:
                children[(preset, phase)] = json.load(f)
            print(f"  done; load1 now {loadavg1():.2f}", flush=True)
    finally:
        if os.path.exists(MY_LOCK):
            os.remove(MY_LOCK)
    finished = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    import torch
    result = {
        "what": "MAML++ authors' reference code (AntreasAntoniou/HowToTrainYourMAMLPytorch) timed on synthetic "
                "task batches on this machine, CPU, default torch threads; each preset and phase in a fresh "
                "process",
        "smoke_test": bool(opts.smoke),
        "started": started,
        "finished": finished,
        "waited_for_quiet_s": waited,
        "load1_at_start": load_at_start,
        "machine": {
            "cpu_model_name": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "numpy": __import__("numpy").__version__,
            "platform": platform.platform(),
        },
        "reference_code": {
            "repo": REPO,
            "note": "No network here: files were read through the stored-repository index (read_file). "
                    "Each row gives the commit of the stored version read and its read_file id. "
                    "The same repo also holds a later src/ refactor (src/learner.py etc., commit 0cbec876) "
                    "which was not used; the top-level files named in the repo README were used.",
            "files": [
                {"local": loc, "repo_path": rp, "commit": c, "read_file_id": i,
                 "sha256_of_local_copy": sha256(os.path.join(HERE, loc))}
                for loc, rp, c, i in SOURCES
            ],
        },
        "edits_to_reference_code": EDITS,
        "method": {
            "train": "run_train_iter(data_batch, epoch=0): epoch 0 => second order (epoch > "
                     "first_order_to_second_order_epoch=-1) and MSL (epoch < multi_step_loss_num_epochs) so every "
                     "inner step's target loss counts; 1 warm-up iteration then N timed iterations, one fresh "
                     "random batch per iteration generated outside the timer; s_per_iter = median.",
            "validation": "run_validation_iter(data_batch): 5 inner steps, first order, BN stats restored per "
                          "task; 1 warm-up batch (batch_size tasks) then the timed tasks in batches of "
                          "batch_size (last batch partial); s_per_task = total timed seconds / tasks.",
            "peak_rss": "resource.getrusage(RUSAGE_SELF).ru_maxrss at the end of each phase's own fresh "
                        "process (includes interpreter + torch import + model build); GiB = KiB / 1024**2.",
            "data": "torch.rand images in the loader layout (tasks, ways, shots|targets, C, H, W) float32; labels "
                    "int64 (tasks, ways, shots|targets) with class i labelled i (0..ways-1).",
        },
        "presets": {},
    }
    for preset in PRESETS:
        tr = children[(preset, "train")]
        va = children[(preset, "val")]
        result["presets"][preset] = {
            "config": tr["config"],
            "settings": tr["settings"],
            "trainable_params": tr["n_params_trainable"],
            "torch_threads": tr["torch_threads"],
            "train": {
                "s_per_iter_median": tr["s_per_iter_median"],
                "s_per_iter_samples": tr["s_per_iter_samples"],
                "warmup_s": tr["warmup_s"],
                "iterations_timed": tr["iterations_timed"],
                "tasks_per_iter": tr["tasks_per_iter"],
                "second_order_active": tr["second_order_active"],
                "msl_active": tr["msl_active"],
                "importance_vector_epoch0": tr["importance_vector_epoch0"],
                "losses": tr["losses"],
                "peak_rss_gib": tr["peak_rss_gib"],
                "ru_maxrss_kib": tr["ru_maxrss_kib"],
                "ru_maxrss_kib_after_build": tr["ru_maxrss_kib_after_build"],
            },
            "validation": {
                "s_per_task": va["s_per_task"],
                "tasks_timed": va["val_tasks_timed"],
                "calls": va["val_calls"],
                "warmup_s": va["warmup_s"],
                "peak_rss_gib": va["peak_rss_gib"],
                "ru_maxrss_kib": va["ru_maxrss_kib"],
                "ru_maxrss_kib_after_build": va["ru_maxrss_kib_after_build"],
            },
        }
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print("wrote", opts.out)
    for preset, r in result["presets"].items():
        print(f"{preset}: train {r['train']['s_per_iter_median']:.3f} s/iter (median of "
              f"{r['train']['iterations_timed']}), peak RSS {r['train']['peak_rss_gib']:.3f} GiB; "
              f"val {r['validation']['s_per_task']:.4f} s/task, peak RSS {r['validation']['peak_rss_gib']:.3f} GiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "result.json"))
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--preset", choices=list(PRESETS))
    ap.add_argument("--phase", choices=["train", "val"])
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--val-tasks", type=int, default=1)
    ap.add_argument("--child-out")
    opts = ap.parse_args()
    if opts.child:
        run_child(opts)
    elif opts.all:
        run_driver(opts)
    else:
        ap.error("use --all (driver) or --child")


if __name__ == "__main__":
    main()
