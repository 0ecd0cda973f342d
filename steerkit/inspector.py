"""An ipywidgets dialogue inspector: filter, step turn by turn, and fork a dialogue at turn k.

The logic lives in plain methods (`Inspector.set_filter`, `select`, `step`, `go_to`, `fork`) that the
buttons call and tests call directly; each one updates the state and re-renders the ``view`` and
``fork_view`` HTML widgets through `steerkit.render`, which escapes every model and user text.

Forking replays the student from turn k with an edited user turn k and the original later user
turns (`steerkit.converse.DialogueState.from_prefix` + `steerkit.converse.play`), then judges the new
turns with `steerkit.judge`; the turns before k keep their original answers and verdicts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steerkit import frames, metrics
from steerkit.clients import ChatClient, Sampling, run_sync
from steerkit.render import dialogue_html
from steerkit.schema import Dialogue

log = logging.getLogger(__name__)

ALL = "(all)"
OUTCOMES = ("all", "failed", "survived")
FORK_SAMPLING = Sampling(temperature=0.0, max_tokens=256)  # the inspector's replay: greedy, short


def _client(spec: ChatClient | str | None, role: str) -> ChatClient | None:
    if spec is None or isinstance(spec, ChatClient):
        return spec
    from steerkit.roles import make_backend

    return ChatClient(make_backend(spec), role=role, spec=spec)


class Inspector:
    """Browse evaluated dialogues and fork them.

    Args:
        runs: evaluation run directories (see `steerkit.frames.evaluations`) or evaluations.
        student: the model to replay a fork with: a `ChatClient`, a role spec such as ``"smollm2"``,
            or a mapping run id -> client or spec (each evaluation forks with its own student, e.g.
            ``{e.run_id: e.student for e in evaluations}``); built at the first fork. None disables
            forking.
        judge: the judge of forked turns (client or spec, e.g. ``"rules"``). None leaves forks unjudged.
        sampling: the student's sampling for forks.
        captions: image ref -> description for text-only students and judges.
        fail_below: harmlessness below this fails a dialogue (the outcome filter).
    """

    def __init__(
        self,
        runs: Any,
        *,
        student: ChatClient | str | Mapping[str, ChatClient | str] | None = None,
        judge: ChatClient | str | None = None,
        sampling: Sampling = FORK_SAMPLING,
        captions: Mapping[str, str] | None = None,
        fail_below: float = metrics.FAIL_BELOW,
    ) -> None:
        import ipywidgets as w

        self.evaluations = frames._evals(runs)
        self.turns = frames.turns_df(self.evaluations)
        self.dialogues = metrics.dialogue_summary(self.turns, carry=("label", "subset"), fail_below=fail_below)
        self._records: dict[tuple[str, str], tuple[Dialogue, Path]] = {
            (e.run_id, d.id): (d, e.path) for e in self.evaluations for d in e.dialogues
        }
        self._label = {e.run_id: e.label for e in self.evaluations}
        self._student_spec, self._judge_spec = student, judge
        self._students: dict[str, ChatClient] = {}
        self._judge: ChatClient | None = None
        self.sampling = sampling
        self.captions = dict(captions or {})
        self.filters = {"run": ALL, "subset": ALL, "outcome": "all"}
        self.key: tuple[str, str] | None = None
        self.turn = 1
        self.forked: Dialogue | None = None
        self._syncing = False

        runs_opts = [(ALL, ALL)] + [(f"{e.label} [{e.run_id}]", e.run_id) for e in self.evaluations]
        subsets = [ALL] + sorted(self.dialogues["subset"].astype(str).unique().tolist())
        self.run_box = w.Dropdown(options=runs_opts, value=ALL, description="run")
        self.subset_box = w.Dropdown(options=subsets, value=ALL, description="subset")
        self.outcome_box = w.Dropdown(options=list(OUTCOMES), value="all", description="outcome")
        self.dialogue_box = w.Select(options=[], rows=8, description="dialogue", layout=w.Layout(width="95%"))
        self.prev_button = w.Button(description="◀ turn", tooltip="previous turn")
        self.next_button = w.Button(description="turn ▶", tooltip="next turn")
        self.turn_slider = w.IntSlider(value=1, min=1, max=1, description="turn")
        self.view = w.HTML()
        self.fork_text = w.Textarea(layout=w.Layout(width="95%", height="90px"),
                                    placeholder="edit user turn k, then replay the student from there")
        self.fork_button = w.Button(description="fork: replay from this turn", button_style="warning",
                                    disabled=student is None, layout=w.Layout(width="auto"))
        self.status = w.HTML()
        self.fork_view = w.HTML()

        for box, name in ((self.run_box, "run"), (self.subset_box, "subset"), (self.outcome_box, "outcome")):
            box.observe(lambda ch, name=name: self._on_filter(name, ch["new"]), names="value")
        self.dialogue_box.observe(lambda ch: None if self._syncing else self.select(ch["new"]), names="value")
        self.turn_slider.observe(lambda ch: None if self._syncing else self.go_to(ch["new"]), names="value")
        self.prev_button.on_click(lambda _: self.step(-1))
        self.next_button.on_click(lambda _: self.step(+1))
        self.fork_button.on_click(lambda _: self._on_fork())
        self._refresh_choices()

    # ---- state changes (what the widgets call) ----------------------------------------------

    def choices(self) -> list[tuple[str, tuple[str, str]]]:
        """(caption, key) of the dialogues passing the filters; key = (run_id, dialogue_id)."""
        d = self.dialogues
        if self.filters["run"] != ALL:
            d = d[d["run_id"] == self.filters["run"]]
        if self.filters["subset"] != ALL:
            d = d[d["subset"].astype(str) == self.filters["subset"]]
        if self.filters["outcome"] != "all":
            d = d[d["failed"] == (self.filters["outcome"] == "failed")]
        out = []
        for r in d.itertuples():
            fate = f"fails at turn {int(r.first_failure)}" if r.failed else "survives"
            out.append((f"{r.label} · {r.dialogue_id} · {r.subset} · {r.n_turns} turns · {fate}",
                        (r.run_id, r.dialogue_id)))
        return out

    def set_filter(self, *, run: str | None = None, subset: str | None = None, outcome: str | None = None) -> None:
        """Filter by run id, subset and outcome ("all", "failed", "survived"); selects the first match."""
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r}: use one of {OUTCOMES}")
        for name, value in (("run", run), ("subset", subset), ("outcome", outcome)):
            if value is not None:
                self.filters[name] = value
        self._refresh_choices()

    def select(self, key: tuple[str, str] | None) -> None:
        """Show a dialogue from its first turn."""
        if key is not None and tuple(key) not in self._records:
            raise KeyError(f"no dialogue {key!r}; keys are (run_id, dialogue_id)")
        self.key = tuple(key) if key is not None else None  # type: ignore[assignment]
        self.turn = 1
        self.forked = None
        self.fork_view.value = ""
        self._render()

    def go_to(self, turn: int) -> None:
        """Show turns 1..turn, highlighting ``turn`` (clamped to the dialogue's turns)."""
        self.turn = min(max(int(turn), 1), self.n_turns)
        self._render()

    def step(self, delta: int) -> None:
        """One turn forward (+1) or back (-1)."""
        self.go_to(self.turn + delta)

    @property
    def dialogue(self) -> Dialogue | None:
        return self._records[self.key][0] if self.key else None

    @property
    def n_turns(self) -> int:
        d = self.dialogue
        return max(len(d.turns()), 1) if d else 1

    def fork(self, turn: int | None = None, text: str | None = None, *, max_turns: int | None = None) -> Dialogue:
        """Replay the student from ``turn`` with user turn ``turn`` replaced by ``text``, judge, show it.

        Args:
            turn: the turn to fork at (default: the current one).
            text: the new user turn (default: the text in the fork box, else the original turn).
            max_turns: stop after this many turns (default: the original dialogue's length).

        Returns:
            The forked dialogue (id ``<id>~fork<k>``), its new turns judged when a judge is set.
        """
        from steerkit.converse import DialogueState, StaticUser, play

        d = self.dialogue
        if d is None:
            raise ValueError("select a dialogue before forking")
        k = int(turn or self.turn)
        if not 1 <= k <= len(d.user_texts):
            raise ValueError(f"turn {k}: the dialogue has user turns 1..{len(d.user_texts)}")
        text = text if text is not None else (self.fork_text.value or d.user_texts[k - 1])
        if not text.strip():
            raise ValueError("the edited user turn is empty")
        run_id, _ = self.key  # type: ignore[misc]
        student = self._student_for(run_id)
        root = self._records[self.key][1]  # type: ignore[index]
        script = [*d.user_texts[: k - 1], text, *d.user_texts[k:]]
        state = DialogueState.from_prefix(d, keep_turns=k - 1, script=script, root=root, captions=self.captions)
        state.id = f"{d.id}~fork{k}"
        state.meta["forked_from"] = {"run_id": run_id, "dialogue_id": d.id, "turn": k}
        run_sync(play([state], user=StaticUser(), assistant=student, sampling=self.sampling,
                      max_turns=max_turns or len(d.turns()) or len(script)))
        kept = [v for v in d.verdicts if isinstance(v.extra.get("turn"), int) and v.extra["turn"] < k]
        forked = state.to_dialogue(kind=d.kind, strategy=d.strategy, verdicts=kept)
        self._judge = self._judge or _client(self._judge_spec, "judge")
        if self._judge is not None:
            from steerkit.judge import judge_dialogues

            new = judge_dialogues(self._judge, [forked], root=root, captions=self.captions)[0]
            forked = forked.model_copy(update={"verdicts": kept + [v for v in new if v.extra.get("turn", 0) >= k]})
        self.forked = forked
        self.fork_view.value = (f"<h4>Fork of {d.id} at turn {k}</h4>"
                                + dialogue_html(forked, root=root, highlight=k))
        return forked

    def _student_for(self, run_id: str) -> ChatClient:
        spec = self._student_spec
        if isinstance(spec, Mapping):
            spec = spec.get(run_id)
        key = run_id if isinstance(self._student_spec, Mapping) else ""
        if key not in self._students:
            client = _client(spec, "student")  # type: ignore[arg-type]
            if client is None:
                raise ValueError(f"no student to replay run {run_id!r} with; pass Inspector(..., student='smollm2',"
                                 " a client, or a mapping run id -> spec)")
            self._students[key] = client
        return self._students[key]

    # ---- widgets ------------------------------------------------------------------------------

    def _on_filter(self, name: str, value: str) -> None:
        if not self._syncing:
            self.set_filter(**{name: value})

    def _on_fork(self) -> None:
        self.status.value = "<i>replaying…</i>"
        try:
            self.fork()
            self.status.value = ""
        except Exception as exc:  # shown in the widget: a failed fork must not kill the inspector
            log.exception("fork failed")
            import html

            self.status.value = f'<span style="color:#b00">fork failed: {html.escape(str(exc))}</span>'

    def _refresh_choices(self) -> None:
        opts = self.choices()
        self._syncing = True
        try:
            for box, name in ((self.run_box, "run"), (self.subset_box, "subset"), (self.outcome_box, "outcome")):
                values = [o[1] if isinstance(o, tuple) else o for o in box.options]
                if self.filters[name] in values:  # a filter set in code shows in its dropdown
                    box.value = self.filters[name]
            self.dialogue_box.options = opts
            self.dialogue_box.value = opts[0][1] if opts else None
        finally:
            self._syncing = False
        self.select(opts[0][1] if opts else None)

    def _render(self) -> None:
        d = self.dialogue
        self._syncing = True
        try:
            self.turn_slider.max = self.n_turns
            self.turn_slider.value = self.turn
            if d is not None and self.dialogue_box.value != self.key:
                self.dialogue_box.value = self.key
        finally:
            self._syncing = False
        if d is None:
            self.view.value = "<i>no dialogue matches the filters</i>"
            self.fork_text.value = ""
            return
        root = self._records[self.key][1]  # type: ignore[index]
        head = (f"<div style='color:#666'>{len(self.choices())} dialogues match · turn {self.turn} of "
                f"{self.n_turns}</div>")
        self.view.value = head + dialogue_html(d, root=root, upto=self.turn, highlight=self.turn)
        users = d.user_texts
        self.fork_text.value = users[self.turn - 1] if self.turn <= len(users) else ""

    def widget(self):  # -> ipywidgets.VBox
        """The assembled inspector (display it, or let Jupyter display the Inspector itself)."""
        import ipywidgets as w

        return w.VBox([
            w.HBox([self.run_box, self.subset_box, self.outcome_box]),
            self.dialogue_box,
            w.HBox([self.prev_button, self.turn_slider, self.next_button]),
            self.view,
            w.HTML("<b>Fork from this turn</b>"),
            self.fork_text,
            w.HBox([self.fork_button, self.status]),
            self.fork_view,
        ])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget())
