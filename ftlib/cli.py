"""The one command-line entry point; every Makefile target is a thin wrapper around it.

    python -m ftlib show RECIPE [key=value ...]          print the resolved recipe
    python -m ftlib train RECIPE [key=value ...]         preprocess (array) -> train -> serve (if serve.enabled)
    python -m ftlib preprocess RECIPE [key=value ...]    only the preprocessing array
    python -m ftlib sweep RECIPE [key=value ...]         a recipe's sweep: tokenize once, the trials as one array
    python -m ftlib serve runs/<sweep> [--best]          every finished trial's adapter (or the best) on one endpoint
    python -m ftlib serve RECIPE|RUN [key=value ...]     serve a finished run
    python -m ftlib demo [key=value ...]                 the whole pipeline locally on the embedded default
    python -m ftlib status [RUN]                         stages, states, failures (all runs without RUN)
    python -m ftlib logs RUN [--stage S] [--task K]      a stage's log
    python -m ftlib cancel RUN                           cancel the run's jobs
    python -m ftlib report RUN                           report.md + plots in the run directory
    python -m ftlib eval RUN [--data file.jsonl]         held-out loss/perplexity, base vs adapter
    python -m ftlib export RUN                           merged full model in RUN/merged
    python -m ftlib tensorboard [RUNS]                   TensorBoard on loopback behind a secret + the ssh -L line
    python -m ftlib tunnel RUN [--open]                  the ssh -L line to a serve job
    python -m ftlib shard RECIPE --index K --num-shards N   one preprocessing shard (slurm/preprocess.sbatch)
    python -m ftlib stage RECIPE [--into DIR]            fetch hub models/data for offline nodes; a local recipe
    python -m ftlib schema                               the recipe reference (Markdown)

`train`, `preprocess` and `serve` take --dry-run: print the sbatch scripts instead of submitting them.
A RUN is a run directory (runs/<name>); its recipe.yaml is used.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from ftlib.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "recipes" / "demo.yaml"


def _load(target: str, overrides):
    """A recipe file, or a run directory (its saved recipe.yaml)."""
    from ftlib import recipe as recipe_mod

    path = Path(target)
    if path.is_dir():
        path = path / "recipe.yaml"
    return recipe_mod.load(path, list(overrides))


def cmd_show(args):
    from ftlib import recipe as recipe_mod

    print(recipe_mod.to_yaml(_load(args.recipe, args.overrides)), end="")


def cmd_submit(args):
    """train / preprocess / serve: the same chain on Slurm or on this machine."""
    from ftlib import sweep
    from launcher import executors, launch, stages as stages_mod

    if args.command == "serve" and sweep.is_sweep(args.recipe):  # every finished trial's adapter on one endpoint
        from launcher.sweep import serve_recipe

        recipe = serve_recipe(args.recipe, best_only=args.best)
        recipe = _load(str(launch.save_recipe(recipe).recipe), args.overrides) if args.overrides else recipe
    else:
        recipe = _load(args.recipe, args.overrides)
        if args.command in ("train", "sweep") and recipe.sweep.enabled:
            return _submit_sweep(args, recipe)
        if args.command == "sweep":
            raise SystemExit(f"{args.recipe}: no sweep: section (sweep.grid or sweep.samples): `make train` runs it")
        if args.best:
            raise SystemExit("--best (BEST=1) chooses among a sweep's trials: give a sweep's folder, runs/<sweep>")
    run = RunDir.of(recipe)
    stages = stages_mod.for_command(args.command, recipe)
    names = [s.name for s in stages]
    if args.dry_run:
        for path in launch.dry_run(recipe, stages):
            print(f"# ---- {path}\n{path.read_text()}")
        print(f"# (dry run: nothing submitted; scripts written to {run.sbatch})")
        return
    if "serve" in names:
        ensure_serving_env(recipe)
    launcher = launch.resolve_launcher(recipe)
    print(f"run {recipe.run.name}: {' -> '.join(names)} on {launcher}; run directory {run.root}")
    executor = executors.Slurm() if launcher == "slurm" else executors.Local()
    submitted = launch.run_chain(recipe, stages, executor)
    if launcher == "slurm":
        print(f"watch it: make status RUN={_rel(run.root)}   logs: make logs RUN={_rel(run.root)} "
              f"STAGE={submitted[-1].stage if submitted else 'train'}")
        if names == ["serve"] and submitted:
            print(f"[serve] waiting for job {submitted[0].job_id} to start the endpoint ...")
            endpoint = launch.wait_for_endpoint(recipe, submitted[0].job_id, recipe.serve.startup_timeout_s + 3600)
            _print_endpoint(recipe, endpoint)
        elif "serve" in names:
            print(f"once serving: make tunnel RUN={_rel(run.root)}")
    if args.command == "preprocess":
        from ftlib.data.preprocess import output_dir

        print(output_dir(recipe))


def _submit_sweep(args, recipe):
    from launcher import executors, launch
    from launcher.sweep import submit_sweep

    path = Path(args.recipe)
    path = path / "recipe.yaml" if path.is_dir() else path
    if args.dry_run:
        executor = executors.DryRun()
        submit_sweep(path, args.overrides, executor)
        for script in executor.written:
            print(f"# ---- {script}\n{script.read_text()}")
        print(f"# (dry run: nothing submitted; scripts written to {RunDir.of(recipe).sbatch})")
        return
    launcher = launch.resolve_launcher(recipe)
    submit_sweep(path, args.overrides, executors.Slurm() if launcher == "slurm" else executors.Local())
    folder = _rel(RunDir.of(recipe).root)
    print(f"watch it: make status RUN={folder}   compare: make report RUN={folder}   serve the trials: "
          f"make serve RUN={folder} [BEST=1]")


def ensure_serving_env(recipe) -> None:
    """serve.engine=vllm on a model vLLM can serve needs the serving environment (.venv-serve): build it now, on
    this machine (the login node), if it is missing, half-built or out of date; env/setup.sh says so in one line with
    its size and time. Jobs never build it: a serve node without it falls back to hf, saying why."""
    from ftlib.errors import UserError
    from ftlib.serve import vllm_engine

    if recipe.serve.engine.value != "vllm" or recipe.serve.python or vllm_engine.has_vllm() \
            or vllm_engine.model_why_not(recipe):
        return  # hf; a serving environment of the user's own; already in one; or a model vLLM cannot run
    sys.stdout.flush()  # our lines first, then its
    done = subprocess.run(["bash", str(ROOT / "env" / "setup.sh"), "serve"],
                          env={**os.environ, "SERVE_VENV": str(vllm_engine.SERVE_VENV)})
    if done.returncode != 0:
        raise UserError(f"could not build the serving environment {vllm_engine.SERVE_VENV} for serve.engine=vllm "
                        f"(env/setup.sh serve, its output is above); serve.engine=hf serves without it")


def _print_endpoint(recipe, endpoint: dict) -> None:
    run = _rel(recipe.run.dir)
    print(f"[serve] endpoint up: {endpoint['url']}  models: {', '.join(endpoint.get('models', []))}")
    print(f"  token:  {endpoint['token_file']} (readable only by you)")
    print(f"  tunnel: make tunnel RUN={run}    (prints the ssh -L command for your laptop)")
    print(f"  try:    curl -H \"Authorization: Bearer $(cat {endpoint['token_file']})\" {endpoint['url']}/v1/models")


def cmd_demo(args):
    """The whole pipeline locally: array preprocessing, 2-process DeepSpeed LoRA, Serve, two requests."""
    from launcher import launch
    from ftlib.serve.local import start_local

    recipe = _load(str(DEMO_RECIPE), ["run.launcher=local", *args.overrides])
    print(f"demo: run directory {recipe.run.dir}")
    ensure_serving_env(recipe)  # the demo's tiny model is served by hf: only a vLLM-capable override needs it
    launch.run_local(recipe, ["preprocess", "train"])
    serve_log = RunDir.of(recipe).serve_log
    serve_log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[serve] starting a local Ray Serve endpoint on the adapter (log: {serve_log}) ...")
    with start_local(recipe, log_file=str(serve_log)) as ep:
        from ftlib.data.formats import alpaca_prompt

        prompt = alpaca_prompt("Tell me a story about a dog.", style=recipe.data.prompt_style)
        answer = _post(ep.url + "/", [{"text": prompt}], ep.token)
        print(f"\n[serve] POST / (the notebook's format):\n{answer[0]['responses'].strip()}\n")
        body = {"model": recipe.served_model_name, "prompt": prompt, "max_tokens": 32, "temperature": 0}
        completion = _post(ep.url + "/v1/completions", body, ep.token)
        print(f"[serve] POST /v1/completions (OpenAI format):\n{completion['choices'][0]['text'].strip()}\n")
    print(f"demo finished. Run directory: {recipe.run.dir}")
    print(f"TensorBoard: make tensorboard RUNS={_rel(Path(recipe.run.dir).parent)}")


def _post(url: str, body, token: str):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def cmd_load_adapter(args):
    """Serve one more adapter from the running endpoint of RUN, by name, without a restart (POST /admin/adapters)."""
    from ftlib.rundir import read_json

    run = RunDir(Path(args.run))
    endpoint = read_json(run.endpoint)
    if not endpoint:
        raise SystemExit(f"no running endpoint for {args.run} (no {run.endpoint}): make serve RUN={args.run}")
    token = Path(endpoint["token_file"]).read_text().strip()
    path = str(Path(args.path).expanduser().resolve())
    try:
        answer = _post(endpoint["url"] + "/admin/adapters", {"name": args.name, "path": path}, token)
    except urllib.error.HTTPError as e:
        raise SystemExit(f"refused ({e.code}): {json.loads(e.read())['error']['message']}")
    print(f"[serve] {args.name} is served from {path}; models: {', '.join(answer['models'])}")


def cmd_status(args):
    from ftlib.report import run_summaries
    from launcher.records import JobRecords
    from launcher.status import status

    if args.run:
        from ftlib.sweep import is_sweep
        from launcher.sweep import sweep_status

        print(sweep_status(args.run) if is_sweep(args.run) else status(RunDir(args.run)))
        return
    runs = run_summaries(args.runs, stage_states=lambda run: JobRecords(run).stage_states())
    if not runs:
        print(f"no runs under {args.runs}/")
    print(f"{'run':<28}{'stages':<44}{'train loss':>11}{'eval loss':>11}{'tokens/s':>10}")
    for r in runs:
        stages = " ".join(f"{name}:{s['state'] or s['launcher']}" for name, s in r["stages"].items()) or "-"
        print(f"{r['name']:<28}{stages:<44}{_num(r['train_loss']):>11}{_num(r['eval_loss']):>11}"
              f"{_num(r['tokens_per_s'], 0):>10}")


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cmd_report(args):
    from ftlib.report import write_report
    from ftlib.sweep import is_sweep
    from launcher.records import train_usage

    if is_sweep(args.run):
        from ftlib.report import write_sweep_report
        from launcher.sweep import trial_rows

        print(write_sweep_report(args.run, trial_rows(args.run)))
        return
    print(write_report(args.run, usage=train_usage(RunDir(args.run))))


def cmd_eval(args):
    from ftlib.evaluate import evaluate
    from ftlib.rundir import use_private_files

    recipe = _load(args.run, args.overrides)
    use_private_files(recipe)
    results = evaluate(recipe, data=args.data)
    for name in ("base", "adapter"):
        r = results.get(name) or {}
        if r:
            print(f"{name:<8} loss {r.get('loss', float('nan')):.4f}  perplexity {r.get('perplexity', float('nan')):.2f}")
    print(f"generations side by side: {RunDir.of(recipe).eval_generations}")


def cmd_export(args):
    from ftlib.export import export
    from ftlib.rundir import use_private_files

    recipe = _load(args.run, args.overrides)
    use_private_files(recipe)
    print(export(recipe))


def cmd_tensorboard(args):
    from ftlib.tensorboard import serve

    serve(args.runs)


def cmd_tunnel(args):
    import shlex
    import subprocess

    from ftlib.serve.tunnel import ssh_command
    from ftlib.tensorboard import login_host

    command = ssh_command(RunDir(args.run).endpoint, args.login_host or login_host(), args.local_port)
    print(command)
    print(f"then: curl -H \"Authorization: Bearer $(cat {RunDir(args.run).token})\" "
          f"http://localhost:{args.local_port}/v1/models")
    if args.open:
        subprocess.run(shlex.split(command), check=False)


def cmd_logs(args):
    from launcher.status import log_path

    run = RunDir(args.run)
    for err in (False, True):
        path = log_path(run, args.stage, args.task, err=err)
        print(f"==> {path} <==")
        print(path.read_text(errors="replace") if path.exists() else "(not written yet)")


def cmd_cancel(args):
    from launcher.status import cancel_and_wait

    print(cancel_and_wait(RunDir(args.run)))


def cmd_shard(args):
    from ftlib.data.preprocess import run_shard

    recipe = _load(args.recipe, args.overrides)
    print(run_shard(recipe, args.index, args.num_shards))


def cmd_stage(args):
    from ftlib.stage import hub_names, stage

    recipe = _load(args.recipe, args.overrides)
    if not hub_names(recipe):
        print("[stage] every model, tokenizer and data source of the recipe is a local path already")
    path = stage(recipe, Path(args.into))
    print(f"staged recipe: {path}\nsubmit it from here (compute nodes may run offline): make train RECIPE={_rel(path)}")


def cmd_schema(args):
    from ftlib.recipe import schema_reference, update_readme

    if args.readme:
        update_readme(args.readme)
    else:
        print(schema_reference(), end="")


def _rel(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ftlib", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, recipe=True, help=""):
        s = sub.add_parser(name, help=help)
        if recipe:
            s.add_argument("recipe", help="recipe file, or a run directory")
            s.add_argument("overrides", nargs="*", help="key=value overrides")
        s.set_defaults(fn=fn)
        return s

    add("show", cmd_show, help="print the resolved recipe")
    for name in ("train", "preprocess", "serve", "sweep"):
        s = add(name, cmd_submit, help=f"submit the {name} stage(s)" if name != "sweep" else
                "submit a recipe's sweep: one tokenization, the trials as one training array")
        s.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
        s.add_argument("--best", action="store_true", help="serve: only a sweep's best trial")
    d = add("demo", cmd_demo, recipe=False, help="the whole pipeline locally on the embedded default")
    d.add_argument("overrides", nargs="*")
    s = add("status", cmd_status, recipe=False, help="state of a run's stages (all runs without RUN)")
    s.add_argument("run", nargs="?")
    s.add_argument("--runs", default="runs", help="where runs live (without RUN)")
    add("report", cmd_report, recipe=False, help="report.md and plots of a run").add_argument("run")
    s = add("eval", cmd_eval, recipe=False, help="held-out loss of base vs adapter, generations side by side")
    s.add_argument("run")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--data", default=None, help="an alpaca-format file instead of the run's eval split")
    s = add("export", cmd_export, recipe=False, help="merge the adapter into a full model (merged/)")
    s.add_argument("run")
    s.add_argument("overrides", nargs="*")
    add("tensorboard", cmd_tensorboard, recipe=False, help="TensorBoard over all runs, on loopback").add_argument(
        "runs", nargs="?", default="runs")
    s = add("tunnel", cmd_tunnel, recipe=False, help="the ssh -L command that reaches a serve job")
    s.add_argument("run")
    s.add_argument("--login-host", default=None, help="default: this machine's name")
    s.add_argument("--local-port", type=int, default=8000)
    s.add_argument("--open", action="store_true", help="run the ssh command")
    s = add("logs", cmd_logs, recipe=False, help="a stage's log")
    s.add_argument("run")
    s.add_argument("--stage", default="train", choices=["preprocess", "train", "serve"])
    s.add_argument("--task", type=int, default=0, help="array index (preprocess) or rank (train)")
    add("cancel", cmd_cancel, recipe=False, help="cancel a run's jobs").add_argument("run")
    s = add("load-adapter", cmd_load_adapter, recipe=False, help="serve one more adapter from a running endpoint")
    s.add_argument("run")
    s.add_argument("name", help="the name clients ask for (model)")
    s.add_argument("path", help="the adapter's folder (visible from the serve nodes)")
    s = add("shard", cmd_shard, help="one preprocessing shard")
    s.add_argument("--index", type=int, required=True)
    s.add_argument("--num-shards", type=int, required=True)
    add("stage", cmd_stage, help="fetch the recipe's hub models and data sets for offline compute nodes").add_argument(
        "--into", default="cache/hub", help="a folder every node sees (default: cache/hub)")
    add("schema", cmd_schema, recipe=False, help="the recipe reference").add_argument(
        "--readme", default=None, help="rewrite this README's recipe reference instead of printing it")
    return p


def main(argv=None) -> int:
    from ftlib.recipe import RecipeError

    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.fn(args)
    except RecipeError as e:
        print(f"recipe error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from ftlib.errors import UserError

        # The errors that say what the user must change; anything else is a bug and keeps its traceback.
        if isinstance(e, (UserError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0
