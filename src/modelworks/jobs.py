"""``modelworks submit WORKFLOW`` and ``modelworks jobs list|status|logs|stop``: workflows as Ray jobs.

A job runs ``modelworks run WORKFLOW ... --json`` on the cluster a profile names (modelworks/profiles.py),
through Ray's job API (the ``ray.job_submission`` SDK; its calls are the lines marked ``# Ray``):

- the job's runtime_env is the profile's (default cluster/runtime_env.yaml: this checkout as the working dir,
  without .git, .venv, data, runs); its env_vars get the profile's storage (MODELWORKS_HOME or
  MODELWORKS_REGISTRY) and nothing from this machine's environment: credentials (AWS keys, tokens) are the
  cluster's own, never copied into a job;
- the profile's workers/GPUs become ``--set`` items of the entrypoint, ahead of the ones given after ``--``;
- token auth as the ``ray`` CLI does it: with RAY_AUTH_MODE=token, the token of RAY_AUTH_TOKEN, else of the file
  RAY_AUTH_TOKEN_PATH names, else of ~/.ray/auth_token, sent as ``Authorization: Bearer``.

``submit`` prints the job's id (one line), then its logs as they come until it ends; it exits 0 only if the job
SUCCEEDED, else it prints the final status and the cause in one line. ``--no-wait`` prints the id and returns.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from modelworks.errors import UserError
from modelworks.profiles import Profile, is_uri, load_profile

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# A cluster just started refuses jobs until its dashboard agent is up; submit waits this long for it.
AGENT_WAIT_S = 60.0


# -- the SDK side ------------------------------------------------------------------------------------------
def auth_headers() -> dict[str, str]:
    """The header the ``ray`` CLI sends: only with RAY_AUTH_MODE=token. Read here rather than left to the SDK,
    which reads Ray's config and token once per process (a process that started a Ray of its own keeps that
    one's)."""
    from modelworks.runtime import ray_token_file

    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = ray_token_file()
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise UserError(f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to the "
                        f"cluster's token file ({path} does not exist)")
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def api_errors(where: str, job_id: str | None = None):
    """The job API's failures as one line each."""
    from ray.exceptions import AuthenticationError  # Ray

    try:
        yield
    except AuthenticationError as err:
        if str(err.message).startswith("Authentication failed"):
            raise UserError(f"the Ray job API at {where} refused the token (403): it is not this cluster's; check "
                            f"RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token") from None
        raise UserError(f"the Ray job API at {where} needs the cluster's token (401): set RAY_AUTH_MODE=token and "
                        f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or put it in ~/.ray/auth_token)") from None
    except ConnectionError:
        raise UserError(f"cannot reach the Ray job API at {where}: is the cluster up, and the tunnel "
                        f"(`kubectl port-forward` / `ray dashboard`) running?") from None
    except RuntimeError as err:
        if job_id and ("404" in str(err) or "does not exist" in str(err)):
            raise UserError(f"no job '{job_id}' at {where} (`modelworks jobs list` shows them)") from None
        failed = re.match(r"Request failed with status code (\d+): (.*)", str(err), re.S)
        if failed:  # the SDK's message is the server's own text: one line of it
            text = failed.group(2).strip()
            reason = text.splitlines()[0].rstrip(". ") if text else "no reason"
            raise UserError(f"the Ray job API at {where} answered {failed.group(1)}: {reason}") from None
        raise


class Jobs:
    """The job API of one cluster."""

    def __init__(self, profile: Profile):
        from ray.job_submission import JobSubmissionClient  # Ray

        # The SDK logs every file it leaves out of the upload, and the default excludes, to this terminal.
        for name in ("ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk",
                     "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.ERROR)
        address = profile.job_address()
        self.where = address or "the default address (RAY_ADDRESS, else this machine's Ray)"
        saved = os.environ.get("RAY_API_SERVER_ADDRESS")
        if address:  # the SDK takes this variable over RAY_ADDRESS and its own argument: the profile wins
            os.environ["RAY_API_SERVER_ADDRESS"] = address
        try:
            with api_errors(self.where):
                self.client = JobSubmissionClient(address, headers=auth_headers())  # Ray
        finally:
            if saved is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = saved

    def submit(self, entrypoint: str, runtime_env: dict | None = None, submission_id: str | None = None) -> str:
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with api_errors(self.where):
                    return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,  # Ray
                                                  submission_id=submission_id)
            except UserError as err:
                # A cluster that has just started answers 500 until its dashboard agent is up ("try again later").
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def info(self, job_id: str):
        with api_errors(self.where, job_id):
            return self.client.get_job_info(job_id)  # Ray

    def list(self) -> list:
        with api_errors(self.where):
            jobs = self.client.list_jobs()  # Ray
        return sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        with api_errors(self.where, job_id):
            return self.client.get_job_logs(job_id)  # Ray

    def follow(self, job_id: str, out=None) -> None:
        """Print the job's logs as they come, until it ends."""
        out = out or sys.stdout

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):  # Ray
                out.write(chunk)
                out.flush()

        with api_errors(self.where, job_id):
            asyncio.run(tail())

    def status(self, job_id: str) -> str:
        with api_errors(self.where, job_id):
            return self.client.get_job_status(job_id).value  # Ray

    def wait(self, job_id: str, timeout_s: float = 60.0) -> str:
        """The job's final status, once it has one."""
        deadline = time.time() + timeout_s
        while True:
            status = self.status(job_id)
            if status in TERMINAL:
                return status
            if time.time() > deadline:
                raise UserError(f"job {job_id} is still {status} after {timeout_s:g} s")
            time.sleep(0.5)

    def stop(self, job_id: str, timeout_s: float = 60.0) -> str:
        """Ask the job to stop; its final status (STOPPED, or what it had already ended with)."""
        with api_errors(self.where, job_id):
            self.client.stop_job(job_id)  # Ray
        return self.wait(job_id, timeout_s)


# -- submit ------------------------------------------------------------------------------------------------
def entrypoint(workflow: str, run_args: list[str], profile: Profile, working_dir: str | None) -> str:
    """``modelworks run WORKFLOW <profile's --set> <run_args> --json``, the workflow relative to the job's
    working dir. The run arguments are checked here, with the workflow's config, before anything is sent."""
    from modelworks.cli import build_parser, run_overrides
    from modelworks.config import apply_overrides, load_workflow_file

    run = build_parser().parse_args(["run", workflow, *run_args])
    if run.cluster:
        raise UserError("--cluster is submit's: give it before `--`, not among the run's arguments")
    there = workflow
    if working_dir and not is_uri(working_dir):
        try:
            there = Path(workflow).resolve().relative_to(Path(working_dir)).as_posix()
        except ValueError:
            raise UserError(f"{workflow} is outside the job's working_dir {working_dir}: the job sees only that "
                            f"folder (run from the checkout's root)") from None
    given = run_overrides(run)
    cfg, _ = load_workflow_file(workflow)
    sets = [] if run.resume else profile.overrides(apply_overrides(cfg, given), given)
    words = ["modelworks", "run", there, *[w for s in sets for w in ("--set", s)], *run_args]
    return shlex.join(words + ([] if run.json else ["--json"]))


def failure_cause(info) -> str:
    """One line: the run's own `error: ...` line when the job's message holds one, else the message's first."""
    lines = [line.strip() for line in (info.message or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[0] if lines else "no message from Ray")


def cmd_submit(args: argparse.Namespace) -> int:
    # argparse hands over WORKFLOW and all that follows it as is: submit's own options are the ones before `--`.
    if not args.argv or args.argv[0].startswith("-"):
        SUBMIT_OPTIONS.error("the workflow file comes first, e.g. modelworks submit workflows/digits.py")
    args.workflow, rest = args.argv[0], args.argv[1:]
    own, run_args = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    SUBMIT_OPTIONS.parse_args(own, namespace=args)
    profile = load_profile(args.cluster)
    runtime_env = profile.job_runtime_env()
    command = entrypoint(args.workflow, run_args, profile, runtime_env.get("working_dir"))
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(args.workflow).stem)
    jobs = Jobs(profile)
    job_id = jobs.submit(command, runtime_env, submission_id=f"modelworks-{stem}-{uuid.uuid4().hex[:8]}")
    print(job_id, flush=True)
    if args.no_wait:
        return 0
    try:
        jobs.follow(job_id)
        status = jobs.status(job_id)
        if status not in TERMINAL:  # the log stream ended before the job did (a dropped connection)
            print(f"the log stream of {job_id} ended early; waiting for the job to end "
                  f"(`modelworks jobs logs {job_id} --follow` shows its log)", file=sys.stderr, flush=True)
            status = jobs.wait(job_id, timeout_s=float("inf"))
    except KeyboardInterrupt:
        print(f"stopped following {job_id}; it keeps running (`modelworks jobs stop {job_id}` stops it)",
              file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        return 0
    print(f"job {job_id} {status}: {failure_cause(jobs.info(job_id))}", file=sys.stderr, flush=True)
    return 1


# -- jobs --------------------------------------------------------------------------------------------------
def describe(job, width: int | None = None) -> str:
    """One line: id, status, start, duration, entrypoint."""
    start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
    took = f"{(job.end_time - job.start_time) / 1000:.1f} s" if job.end_time and job.start_time else "-"
    command = job.entrypoint if width is None or len(job.entrypoint) <= width else job.entrypoint[:width - 3] + "..."
    return f"{job.submission_id}  {job.status.value:<9}  {start}  {took:>8}  {command}"


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = Jobs(load_profile(args.cluster))
    if args.jobs_cmd == "list":
        rows = jobs.list()
        print("\n".join(describe(j, width=80) for j in rows) if rows else f"no jobs at {jobs.where}")
    elif args.jobs_cmd == "status":
        info = jobs.info(args.job)
        print(describe(info))
        if info.status.value in ("FAILED", "STOPPED"):
            print(f"cause: {failure_cause(info)}")
    elif args.jobs_cmd == "logs":
        if args.follow:
            jobs.follow(args.job)
        else:
            print(jobs.logs(args.job), end="", flush=True)
    else:
        print(f"{args.job}  {jobs.stop(args.job)}")
    return 0


CLUSTER_OPTION = argparse.ArgumentParser(add_help=False)
CLUSTER_OPTION.add_argument("--cluster", metavar="PROFILE", help="cluster/profiles/PROFILE.yaml, or a path to a "
                                                                 "profile (default: local)")
SUBMIT_OPTIONS = argparse.ArgumentParser(prog="modelworks submit WORKFLOW", parents=[CLUSTER_OPTION], add_help=False)
SUBMIT_OPTIONS.add_argument("--no-wait", action="store_true", help="print the job id and return")


def add_commands(subparsers) -> None:
    cluster = CLUSTER_OPTION
    submit = subparsers.add_parser(
        "submit", parents=[SUBMIT_OPTIONS], help="run a workflow as a Ray job on a cluster",
        description="Submit `modelworks run WORKFLOW [RUN_ARGS] --json` as a Ray job, print its id, then follow "
                    "its logs until it ends (exit 0 only if it SUCCEEDED).",
        usage="modelworks submit WORKFLOW [--cluster PROFILE] [--no-wait] [-- RUN_ARGS ...]")
    # One REMAINDER positional: argparse would drop the `--` that follows a positional of its own.
    submit.add_argument("argv", nargs=argparse.REMAINDER, metavar="WORKFLOW [-- RUN_ARGS]",
                        help="workflow file inside this checkout (e.g. workflows/digits.py); after `--`: arguments "
                             "of `modelworks run`")
    submit.set_defaults(func=cmd_submit)

    jobs = subparsers.add_parser("jobs", help="Ray jobs on a cluster: list, status, logs, stop")
    sub = jobs.add_subparsers(dest="jobs_cmd", required=True)
    sub.add_parser("list", parents=[cluster], help="the cluster's submitted jobs, oldest first")
    for name, text in (("status", "one job's status (and why it failed)"), ("logs", "one job's logs"),
                       ("stop", "stop a job and wait until it has stopped")):
        p = sub.add_parser(name, parents=[cluster], help=text)
        p.add_argument("job", help="the job id `modelworks submit` printed")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    jobs.set_defaults(func=cmd_jobs)
