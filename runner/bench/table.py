"""The console table of ``python -m runner.bench``'s results."""


def print_table(results: dict) -> None:
    lin, cnn, over, comp = (results.get(k) for k in ("linear_fit", "cnn", "overheads",
                                                       "compiles"))
    rows = []
    if lin:
        rows += [("linear_fit: reference loop", f"{lin['reference_steps_per_s']:,.0f} steps/s"),
                 ("linear_fit: runner loop", f"{lin['runner_steps_per_s']:,.0f} steps/s"),
                 ("linear_fit: runner / reference", f"{lin['runner_over_reference']:.1f}x")]
    arrays = results.get("arrays")
    if arrays and "skipped" not in arrays:
        rows += [("arrays (digits MLP): reference loop",
                  f"{arrays['reference_steps_per_s']:,.0f} steps/s"),
                 ("arrays (digits MLP): runner loop",
                  f"{arrays['runner_steps_per_s']:,.0f} steps/s"),
                 ("arrays: runner / reference", f"{arrays['runner_over_reference']:.1f}x")]
    if cnn:
        rows += [("cnn: reference Flax step", f"{cnn['reference_ms']:.0f} ms "
                  f"({cnn['reference_gflops']:.0f} GFLOP/s)"),
                 ("cnn: runner step", f"{cnn['runner_ms']:.0f} ms "
                  f"({cnn['runner_gflops']:.0f} GFLOP/s)"),
                 ("cnn: runner / reference time", f"{cnn['runner_over_reference']:.2f}")]
        if "torch_ms" in cnn:
            rows += [(f"cnn: PyTorch {cnn['torch_version']} step", f"{cnn['torch_ms']:.0f} ms"),
                     ("cnn: runner / PyTorch time", f"{cnn['runner_over_torch']:.2f}")]
        rows.append(("fp32 matmul (XLA, 2048^3)", f"{cnn['matmul_gflops']:.0f} GFLOP/s"))
    if over:
        for name in ("linear_fit", "cnn_random_images"):
            o = over[name]
            per_1000 = o["log_and_checkpoint_s_per_1000_steps"]
            rows.append((f"{name}: compile / log+ckpt per 1k steps",
                         f"{o['compile_s']:.2f} s / {per_1000:.3f} s"))
        p = over["process"]
        rows += [("bare `import jax, flax, optax`", f"{p['bare_import_s']:.2f} s"),
                 ("`python -m runner` (default)", f"{p['default_run_s']:.2f} s = "
                  f"{p['default_run_over_import']:.1f}x import"),
                 ("  ... trainer.log_images=false", f"{p['no_images_run_s']:.2f} s = "
                  f"{p['no_images_over_import']:.1f}x import")]
    if comp:
        rows.append(("train-step compiles: run / 3-job sweep",
                     f"{comp['per_run']} / {comp['per_sweep']}"))
    rows += _sweep_rows(results.get("sweeps"))
    rows += _feed_rows(results.get("feed"))
    rows += _search_rows(results.get("search"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))


def _sweep_rows(sweeps) -> list:
    """Per sweep: basic and fused against one run, fused against basic; then the goals."""
    if not sweeps:
        return []
    rows = []
    for name, c in sweeps["cases"].items():
        rows += [(f"{name} {c['jobs']}-job sweep / one run: basic",
                  f"{c['basic_over_single']:.2f}x ({c['basic_sweep_s']:.1f} s)"),
                 (f"{name} {c['jobs']}-job sweep / one run: fused",
                  f"{c['fused_over_single']:.2f}x ({c['fused_sweep_s']:.1f} s; "
                  f"{c['fused_over_basic']:.2f}x basic)")]
    goal = sweeps["fused_goal_over_single"]
    rows += [(f"fused linear_fit sweep <= {goal}x one run",
              "met" if sweeps["fused_goal_met"] else "not met"),
             ("fused sweep <= basic, every case",
              "met" if sweeps["fused_never_slower"] else "not met")]
    return rows


def _feed_rows(feed) -> list:
    """task=arrays from the host against on the device; cold reading, memory, start-up."""
    if not feed:
        return []
    n = f"{feed['dataset']['n_train']:,}x{feed['dataset']['features']}"
    rows = [(f"feed {name}: device / host steps/s",
             f"{s['device_steps_per_s']:,.0f} / {s['host_steps_per_s']:,.0f} = "
             f"{s['host_over_device']:.2f}x")
            for name, s in (("digits", feed["steps_per_s"]["digits"]),
                            (n, feed["steps_per_s"]["big"]))]
    cold, mem, start = feed["cold"], feed["memory"], feed["startup"]
    rows += [(f"feed host >= {feed['host_goal_over_device']}x device, both",
              "met" if feed["host_goal_met"] else "not met"),
             ("feed reader examples/s: warm / cold pages",
              f"{cold['read_warm_examples_per_s']:,.0f} / {cold['read_cold_examples_per_s']:,.0f}"),
             ("feed host run examples/s: warm / cold pages",
              f"{cold['warm_consumption_examples_per_s']:,.0f} / "
              f"{cold['run_cold_examples_per_s']:,.0f}"),
             (f"feed {n} host peak RssAnon over baseline",
              f"{mem['host_over_baseline_mib']:,.0f} MiB (goal <= {mem['goal_mib']}; device "
              f"{mem['device_peak_mib'] - mem['baseline_mib']:,.0f})"),
             (f"feed {n} start-up over a small dataset's",
              f"first run {start['first_extra_s']:.2f} s, resume {start['resume_extra_s']:.2f} s")]
    return rows


def _search_rows(search) -> list:
    """Per search: best value, train steps, wall time, and when it reached the target and the
    unpruned best; then the goals."""
    if not search:
        return []
    rows = [(f"search: target (unpruned best - {search['within']:.0%})",
             f"{search['objective']} >= {search['target']:.4f}")]
    for name, s in search["searches"].items():
        if "skipped" in s:
            rows.append((f"search {name}", f"skipped: {s['skipped']}"))
            continue
        reached = [f"{s[k + '_s']:.0f} s, {s[k + '_steps']:,} steps"
                   if s[k + "_s"] is not None else "never" for k in ("to_target", "to_best")]
        best = "none" if s["best"] is None else f"{s['best']:.4f}"
        failed = f" (exit {s['returncode']})" if s["returncode"] else ""
        rows.append((f"search {name}: best / steps / wall / to target / to best",
                     f"{best} / {s['train_steps']:,} / {s['wall_s']:.0f} s / {reached[0]} / "
                     f"{reached[1]}{failed}"))
    for name, met in search["pruned_goals_met"].items():
        rows.append((f"search {name} to target <= {search['steps_goal']:.0%} steps, "
                     f"{search['wall_goal']:.0%} wall",
                     f"steps {'met' if met['steps'] else 'not met'}, "
                     f"wall {'met' if met['wall'] else 'not met'}"))
    rows.append(("search fused pruned <= basic pruned, wall",
                 f"{'met' if search['fused_not_slower'] else 'not met'} "
                 f"({search['fused_over_basic']:.2f}x)"))
    return rows
