"""Running programs: ``ProgramState`` (what ``s`` is), ``function`` / ``Program`` (``run``,
``run_batch``), and the ``Backend`` interface the state talks to.

A state runs its appended expressions in order on a thread of its own: text is added to the
prompt, a chat turn adds the backend's role markers around its content, ``gen`` asks the backend
to continue the text so far, ``select`` asks it to score each choice after the text so far.
Every request extends the previous one's text, so a backend with a prefix cache computes the
shared part once; the program only waits where it reads a result.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvforge.lang.ir import Concat, Expr, Gen, RoleBegin, RoleEnd, Select, Text, as_expr


@dataclass
class Completion:
    """A backend's answer to a generate or select call."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # select: each choice's token-length-normalised log-probability
    scores: list[float] = field(default_factory=list)


class Backend:
    """What a state needs from a model: its chat markers, generation and choice scoring."""

    def role_prefix(self, role: str) -> str:
        """Text that opens a ``role`` turn in the model's chat format."""
        raise NotImplementedError

    def role_suffix(self, role: str) -> str:
        """Text that closes a ``role`` turn."""
        raise NotImplementedError

    def generate(
        self,
        prompt: str,
        sampling: dict[str, Any],
        messages: list[dict[str, str]],
        on_text: Callable[[str], None] | None = None,
    ) -> Completion:
        """Continue ``prompt`` under the OpenAI-style ``sampling`` options (``messages``: the
        same conversation as chat turns, the open one last, for chat-only backends); when
        ``on_text`` is given, call it with the text generated so far as it grows."""
        raise NotImplementedError

    def select(self, prompt: str, choices: list[str], messages: list[dict[str, str]]) -> Completion:
        """Score every choice as a continuation of ``prompt``; ``text`` is the best one."""
        raise NotImplementedError

    def cache_prefix(self, prompt: str) -> Completion:
        """Compute ``prompt`` once so that requests extending it find it cached (a fork calls
        this before its branches start at the same time); a backend without a prefix cache
        does nothing."""
        return Completion("")


class ProgramError(RuntimeError):
    """A program failed; the message names the program and the line that failed."""


_default: list[Backend | None] = [None]


def set_default_backend(backend: Backend) -> None:
    """The backend ``run`` and ``run_batch`` use when none is passed."""
    _default[0] = backend


class ProgramState:
    """The ``s`` of a program: its text so far, chat messages, variables and token counts.

    ``s += expr`` queues ``expr`` and returns at once; a thread of the state's own runs the
    queue in order (a state is one sequence of requests), so the program goes on while the
    model works, and the branches of a fork run at the same time. Reading the state waits
    for what it needs: ``s[name]`` for that variable, ``text()`` / ``messages()`` / ``meta``
    for everything queued. An expression that fails stops the state; the error is raised, as
    a ProgramError naming the program line that appended it, at the next read (or by ``run``).
    """

    def __init__(
        self, backend: Backend, defaults: dict[str, Any] | None = None, stream: bool = False
    ) -> None:
        self.backend = backend
        self.defaults = defaults or {}  # sampling options of gen calls that do not set them
        self.stream = stream  # gen calls pass their text on as it is generated
        self.ret_value: Any = None  # what the program returned
        # written by the worker thread (readers wait for it to be idle, or hold the lock)
        self._text = ""
        self._messages: list[dict[str, str]] = []
        self._role: str | None = None
        self._role_start = 0
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, int] = {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
        }
        self._live = ""  # text of the gen in progress, as streamed so far
        self._live_name: str | None = None
        # shared between the program thread and the worker
        self._cond = threading.Condition()
        self._queue: deque[tuple[Expr, str]] = deque()  # (expression, program line)
        self._busy = False  # a worker thread is running the queue
        self._pending: Counter[str] = Counter()  # variables queued, not produced yet
        self._failure: ProgramError | None = None
        self._ended = False  # the program returned: nothing more will be appended
        self._owner = threading.get_ident()  # the thread running the program
        self._produced: Counter[str] = Counter()  # completed gen / select calls per variable
        # program side
        self._open: str | None = None  # the chat turn open after everything queued
        self._branches: list[ProgramState] = []
        self._fork_start = 0  # where a branch's own text begins

    # ------------------------------------------------------------ program side
    def __iadd__(self, other: object) -> ProgramState:
        expr = as_expr(other)
        where = _program_line()
        with self._cond:
            self._raise_failure()
            self._open = _check_turns(expr, self._open)
            self._queue.append((expr, where))
            self._pending.update(_names(expr))
            start, self._busy = not self._busy, True
        if start:
            threading.Thread(target=self._work, name="kvforge-lang-state", daemon=True).start()
        return self

    def __getitem__(self, name: str) -> Any:
        """The variable; waits while it is queued (from outside a streamed program, also
        while the program may still queue it)."""

        def ready() -> bool:
            if self._failure is not None or self._pending[name]:
                return self._failure is not None
            return name in self._vars or self._settled()

        with self._cond:
            self._cond.wait_for(ready)
            self._raise_failure()
            return self._vars[name]

    def __setitem__(self, name: str, value: Any) -> None:
        with self._cond:
            self._vars[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.variables

    def get_var(self, name: str) -> Any:
        """``s[name]``: waits until the variable is produced."""
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        """``s[name] = value``."""
        self[name] = value

    def fork(self, count: int) -> ForkGroup:
        """``count`` copies of this state that continue separately (and at the same time) from
        the same text; a backend with a prefix cache computes that text once."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("fork needs a positive number of branches")
        self.sync()
        if count > 1 and self._text:
            self._record(None, self.backend.cache_prefix(self._text), append=False)
        return ForkGroup([self._branch() for _ in range(count)], self)

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """One branch for a ``with`` block, joined at its end."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def sync(self) -> None:
        """Wait for everything queued (from outside a streamed program: for its end); raise
        the ProgramError of a failed expression."""
        with self._cond:
            self._cond.wait_for(self._settled)
            self._raise_failure()

    def error(self) -> ProgramError | None:
        """The failure that stopped this state, if any (after waiting as ``sync``)."""
        with self._cond:
            self._cond.wait_for(self._settled)
            return self._failure

    def _settled(self) -> bool:
        """Nothing more will change what a reader sees: the queue is done and, for a reader
        outside the program's thread, the program has ended."""
        if self._failure is not None:
            return True
        if self._busy:
            return False
        return self._ended or threading.get_ident() == self._owner

    # ------------------------------------------------------------- results
    def text(self) -> str:
        """The whole text so far, chat markers included."""
        self.sync()
        return self._text

    def messages(self) -> list[dict[str, str]]:
        """The closed chat turns, as OpenAI-style messages."""
        self.sync()
        return [dict(m) for m in self._messages]

    @property
    def variables(self) -> dict[str, Any]:
        """Every variable (after waiting for everything queued)."""
        self.sync()
        return self._vars

    @property
    def meta(self) -> dict[str, int]:
        """Prompt, completion and cached token counts of the state's requests (a fork's
        branches are added at ``join``)."""
        self.sync()
        return self._meta

    def cached_ratio(self) -> float:
        """Share of prompt tokens the backend found cached."""
        meta = self.meta
        return meta["cached_tokens"] / meta["prompt_tokens"] if meta["prompt_tokens"] else 0.0

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text (or variable ``var_name``'s text) in pieces as it grows, until the program
        ends; with ``run(stream=True)`` the pieces of a gen arrive while it is generated. A
        program's failure is raised after the last piece."""
        if threading.get_ident() == self._owner and not self._ended:
            raise RuntimeError("text_iter waits for the program's end: read it from outside")
        if var_name is None:
            view = self._text_view
        else:  # the value of the variable's next gen (or its last one, once the program ended)
            with self._cond:
                goal = self._produced[var_name] + (0 if var_name in self._vars else 1)
                if self._pending[var_name] and var_name in self._vars:
                    goal += 1
            view = functools.partial(self._var_view, var_name, goal)
        shown = 0
        while True:
            with self._cond:
                text, done = view()
                while not done and len(text) <= shown:
                    self._cond.wait()
                    text, done = view()
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
            if done:
                break
        with self._cond:
            self._raise_failure()

    def _text_view(self) -> tuple[str, bool]:
        return self._text + self._live, self._finished()

    def _var_view(self, name: str, goal: int) -> tuple[str, bool]:
        if self._produced[name] >= goal:
            return str(self._vars[name]), True
        if self._live_name == name:
            return self._live, False
        if self._finished():
            return str(self._vars.get(name, "")), True
        return "", False  # not generating yet

    def _finished(self) -> bool:
        return self._failure is not None or (self._ended and not self._busy)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # ------------------------------------------------------------ execution
    def _work(self) -> None:
        """The worker: run the queue in order until it is empty."""
        while True:
            with self._cond:
                if self._failure is not None:  # what follows a failure does not run
                    self._queue.clear()
                    self._pending.clear()
                if not self._queue:
                    self._busy = False
                    self._cond.notify_all()
                    return
                expr, where = self._queue[0]
            failure = None
            try:
                self._run(expr)
            except Exception as exc:
                failure = ProgramError(f"{where}: {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
            with self._cond:
                self._queue.popleft()
                self._pending.subtract(_names(expr))
                self._live, self._live_name = "", None
                if failure is not None and self._failure is None:
                    self._failure = failure
                self._cond.notify_all()

    def _append(self, text: str) -> None:
        with self._cond:
            self._text += text
            self._cond.notify_all()

    def _show(self, name: str | None, text: str) -> None:
        """A gen's text so far: shown to streams; raises to stop the request once the state
        has failed (the program raised while the gen ran)."""
        with self._cond:
            if self._failure is not None:
                raise _Stopped("the program failed")
            if self.stream:
                self._live, self._live_name = text, name
                self._cond.notify_all()

    def _run(self, expr: Expr) -> None:
        if isinstance(expr, Concat):
            for part in expr.parts:
                self._run(part)
        elif isinstance(expr, Text):
            self._append(expr.text)
        elif isinstance(expr, RoleBegin):
            self._append(self.backend.role_prefix(expr.role))
            self._role, self._role_start = expr.role, len(self._text)
        elif isinstance(expr, RoleEnd):
            content = self._text[self._role_start :]
            self._messages.append({"role": expr.role, "content": content})
            self._append(self.backend.role_suffix(expr.role))
            self._role = None
        elif isinstance(expr, Gen):
            sampling = {**self.defaults, **expr.sampling()}
            on_text = functools.partial(self._show, expr.name)
            result = self.backend.generate(self._text, sampling, self._conversation(), on_text)
            self._record(expr.name, result)
        elif isinstance(expr, Select):
            result = self.backend.select(self._text, expr.choices, self._conversation())
            self._record(expr.name, result)
        else:
            raise TypeError(f"unknown expression {type(expr).__name__}")

    def _conversation(self) -> list[dict[str, str]]:
        """The closed turns plus the open one (its text so far)."""
        messages = [dict(m) for m in self._messages]
        if self._role is not None:
            messages.append({"role": self._role, "content": self._text[self._role_start :]})
        return messages

    def _record(self, name: str | None, result: Completion, append: bool = True) -> None:
        with self._cond:
            for key in self._meta:
                self._meta[key] += getattr(result, key)
            if name is not None:
                self._vars[name] = result.text
                self._produced[name] += 1
            if append:
                self._text += result.text
            self._live, self._live_name = "", None
            self._cond.notify_all()

    def _branch(self) -> ProgramState:
        other = ProgramState(self.backend, self.defaults, self.stream)
        other._owner = self._owner
        other._text, other._messages = self._text, [dict(m) for m in self._messages]
        other._role, other._role_start, other._open = self._role, self._role_start, self._open
        other._vars = dict(self._vars)
        other._fork_start = len(self._text)
        self._branches.append(other)
        return other

    def _end(self, failure: ProgramError | None = None) -> None:
        """The program is over (``failure``: how it failed, if it did): streams end."""
        with self._cond:
            self._ended = True
            if failure is not None and self._failure is None:
                self._failure = failure
            self._cond.notify_all()
        for branch in self._branches:
            branch._end(failure)

    def _finish(self) -> None:
        """End of a program: wait for the queue and for every branch, raise a failure."""
        self.sync()
        error = self._branch_failure()
        if error is not None:
            raise error

    def _branch_failure(self) -> ProgramError | None:
        """The first failure among the branches (and theirs), named by branch index."""
        for index, branch in enumerate(self._branches):
            error = branch.error() or branch._branch_failure()
            if error is not None:
                failure = ProgramError(f"fork branch {index}: {error}")
                failure.__cause__ = error
                return failure
        return None

    def _stop(self) -> None:
        """The program failed: wait for the request in progress (it stops at its next
        token) so none is left running."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy)
        for branch in self._branches:
            branch._stop()


class _Stopped(Exception):
    """Raised into a backend's generation to stop it."""


def _names(expr: Expr) -> list[str]:
    """The variables an expression produces."""
    if isinstance(expr, Concat):
        return [name for part in expr.parts for name in _names(part)]
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    return []


def _check_turns(expr: Expr, open_role: str | None) -> str | None:
    """The chat turn open after ``expr``, or ValueError for turns that do not nest."""
    for part in expr.parts if isinstance(expr, Concat) else [expr]:
        if isinstance(part, RoleBegin):
            if open_role is not None:
                raise ValueError(f"a {part.role} turn cannot open inside a {open_role} turn")
            open_role = part.role
        elif isinstance(part, RoleEnd):
            if open_role != part.role:
                raise ValueError(f"no open {part.role} turn to close")
            open_role = None
    return open_role


def _program_line() -> str:
    """``name (file:line)`` of the innermost program frame calling in (else the caller)."""
    frame = sys._getframe(2)
    caller = frame
    while frame is not None:
        if frame.f_code in _PROGRAM_CODES:
            return f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        frame = frame.f_back  # type: ignore[assignment]
    return f"{caller.f_code.co_name} ({caller.f_code.co_filename}:{caller.f_lineno})"


class ForkGroup(list[ProgramState]):
    """The branches of a fork (a list of states); ``join`` waits for them."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        super().__init__(states)
        self.parent = parent
        self.joined = False  # a second join does nothing

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every branch and raise the first failure (naming the branch and its line).
        ``gather_variable``: each variable the branches made becomes a list (one value per
        branch) in the parent; ``concate_and_append``: the branches' own texts are appended to
        the parent, in order. Either way the branches' token counts are added to the parent's."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"join mode is gather_variable or concate_and_append, not {mode!r}")
        if self.joined:
            return
        for index, branch in enumerate(self):
            error = branch.error() or branch._branch_failure()
            if error is not None:
                raise ProgramError(f"fork branch {index}: {error}") from error
        self.joined = True
        parent = self.parent
        if mode == "concate_and_append":
            parent += "".join(branch._text[branch._fork_start :] for branch in self)
        with parent._cond:
            known = set(parent._vars)
            for branch in self:
                for name, value in branch._vars.items():
                    if mode == "gather_variable" and name not in known:
                        parent._vars.setdefault(name, []).append(value)
                for key, count in branch._meta.items():
                    parent._meta[key] += count
        for branch in self:
            branch._end()

    def __iadd__(self, other: object) -> ForkGroup:  # type: ignore[override, misc]
        """Append to every branch: one expression for all, a list / tuple with one per branch,
        or a function of the branch index."""
        if isinstance(other, (list, tuple)):
            if len(other) != len(self):
                raise ValueError(f"{len(other)} expressions for {len(self)} branches")
            parts = list(other)
        elif callable(other) and not isinstance(other, Expr):
            parts = [other(index) for index in range(len(self))]
        else:
            parts = [other] * len(self)
        for state, part in zip(self, parts):
            state += part
        return self


class Program:
    """A ``@function``: call it inside another program (nested), or ``run`` it."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __call__(self, s: ProgramState, *args: Any, **kwargs: Any) -> Any:
        return self.func(s, *args, **kwargs)

    def run(
        self,
        *args: Any,
        backend: Backend | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program on a fresh state; ``temperature`` / ``top_p`` / ``top_k`` apply to
        its gen calls that do not set them (as SGLang's run). Returns when the program and
        its requests are done, raising a ProgramError that names the line that failed; with
        ``stream=True`` it returns the state at once (read it with ``text_iter``)."""
        chosen = backend or _default[0]
        if chosen is None:
            raise ValueError("no backend: pass backend= or call set_default_backend first")
        defaults = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        state = ProgramState(chosen, {k: v for k, v in defaults.items() if v is not None}, stream)
        if stream:
            threading.Thread(
                target=self._execute, args=(state, args, kwargs), name="kvforge-lang", daemon=True
            ).start()
            return state
        failure = self._execute(state, args, kwargs)
        if failure is not None:
            raise failure
        return state

    def _execute(
        self, state: ProgramState, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ProgramError | None:
        """Run the program on ``state`` to its end; its failure is returned and kept on it."""
        failure = None
        state._owner = threading.get_ident()
        try:
            state.ret_value = self.func(state, *args, **kwargs)
            state._finish()
        except ProgramError as exc:
            failure = exc
        except BaseException as exc:
            failure = ProgramError(f"{self._where(exc)}: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            if not isinstance(exc, Exception) and not state.stream:
                state._end(failure)  # SystemExit, KeyboardInterrupt: end the state, go on
                raise
        state._end(failure)
        if failure is not None:
            state._stop()
        return failure

    def run_batch(
        self,
        batch: Sequence[dict[str, Any]],
        backend: Backend | None = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run the program once per keyword set, ``num_threads`` at a time (their requests
        batch together in the engine); states in input order."""
        threads = min(64, max(1, len(batch))) if num_threads == "auto" else int(num_threads)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = [
                pool.submit(self.run, backend=backend, **sampling, **kwargs) for kwargs in batch
            ]
            for done, _ in enumerate(as_completed(futures), 1):
                if progress_bar:
                    name = self.func.__name__
                    print(f"\r{name}: {done}/{len(batch)}", end="", file=sys.stderr)
            if progress_bar:
                print(file=sys.stderr)
            states = []
            for index, future in enumerate(futures):
                try:
                    states.append(future.result())
                except ProgramError as exc:
                    raise ProgramError(f"run_batch item {index}: {exc}") from exc
            return states

    def _where(self, exc: BaseException) -> str:
        """``name (file:line)`` of the innermost frame of a program in the traceback."""
        where = self.func.__name__
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code in _PROGRAM_CODES:
                where = f"{code.co_name} ({code.co_filename}:{tb.tb_lineno})"
            tb = tb.tb_next
        return where


# code objects of every @function: the frames an error is attributed to
_PROGRAM_CODES: set[Any] = set()


def function(func: Callable[..., Any]) -> Program:
    """Decorate ``def program(s, ...)`` to make it a runnable program."""
    if not callable(func) or not inspect.signature(func).parameters:
        raise TypeError("a program is a function whose first parameter is the state")
    _PROGRAM_CODES.add(func.__code__)
    return Program(func)
