"""`loradrop status`: is the daemon up, where is its inbox, what are its workers doing."""

from __future__ import annotations


def add_parser(sub) -> None:
    from loradrop.proto.connect import add_arguments

    p = sub.add_parser(
        "status",
        help="show the daemon's state",
        description="Show the daemon's home, inbox, workers and queue.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from loradrop.proto.client import Client

    with Client.from_args(args) as daemon:
        s = daemon.status()
    for line in status_lines(s, now=time.time()):
        print(line)
    return 0


def status_lines(s, now: float) -> list[str]:
    """What `loradrop status` prints for the daemon's StatusReply `s`."""
    from loradrop.progress import format_duration

    lines = [
        f"loradrop daemon {s.version}, pid {s.pid}, up {format_duration(now - s.started)}",
        f"home     {s.home}",
        f"inbox    {s.inbox} (quiet time {s.quiet_seconds:g}s)",
        f"model    {s.default_model or 'the embedded tiny twin'}",
    ]
    if s.captioner:
        lines.append(f"captions {s.captioner} (for images without one)")
    if s.cluster.address:
        lines.append(f"cluster  {cluster_line(s.cluster)}")
        lines += [_node_line(n) for n in s.cluster.nodes]
    for w in s.workers:
        doing = f" running {w.job_id}" if w.job_id else ""
        where = f" on {w.node}" if w.node else ""
        pid = f" (pid {w.pid})" if w.pid else ""
        lines.append(f"worker {w.index} {w.device:<7} {w.state}{doing}{where}{pid}")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(s.jobs_by_state.items())) or "no jobs"
    lines.append(f"jobs     {counts}")
    if s.pending_folders:
        lines.append(f"waiting  {', '.join(s.pending_folders)} (until quiet)")
    return lines


def cluster_line(cluster) -> str:
    """The Ray cluster in one line (the TUI's queue shows it too): its live nodes and their GPUs."""
    alive = [n for n in cluster.nodes if n.alive]
    gpus, idle = sum(n.gpus for n in alive), sum(n.gpus_free for n in alive)
    nodes = f"{len(alive)} node{'s' if len(alive) != 1 else ''}"
    line = f"{cluster.address}, {nodes}, {gpus:g} GPU{'s' if gpus != 1 else ''} ({idle:g} idle)"
    if len(alive) < len(cluster.nodes):
        line += f", {len(cluster.nodes) - len(alive)} down"
    if cluster.resource not in ("", "GPU"):  # --ray-resource: say what was counted as a GPU
        line += f", counting the resource {cluster.resource}"
    return line


def _node_line(node) -> str:
    if not node.alive:
        return f"node {node.id} {node.address}  down"
    labels = f"  labels {' '.join(node.labels)}" if node.labels else ""
    return f"node {node.id} {node.address}  {node.gpus:g} GPU ({node.gpus_free:g} idle){labels}"
