"""Counters of proposed and accepted draft tokens (plain Python, read by /metrics and logs)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    """Drafts proposed and accepted over all verifications, overall and per draft position."""

    max_k: int
    num_verifications: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.proposed_per_position = [0] * self.max_k
        self.accepted_per_position = [0] * self.max_k

    def record(self, proposed: int, accepted: int) -> None:
        """One verification of ``proposed`` drafts, of which the first ``accepted`` held."""
        self.num_verifications += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for i in range(min(proposed, self.max_k)):
            self.proposed_per_position[i] += 1
            if i < accepted:
                self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over proposed drafts (0 before any)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verification: accepted drafts plus the target's own token."""
        if not self.num_verifications:
            return 0.0
        return 1 + self.num_accepted_tokens / self.num_verifications

    def position_rates(self) -> list[float]:
        """Acceptance rate of each draft position (given a draft was proposed there)."""
        return [
            a / p if p else 0.0
            for a, p in zip(self.accepted_per_position, self.proposed_per_position)
        ]

    def copy(self) -> SpecDecodeStats:
        """A snapshot of the counters."""
        return self.since(SpecDecodeStats(self.max_k))

    def since(self, earlier: SpecDecodeStats) -> SpecDecodeStats:
        """The counts after the snapshot ``earlier``."""
        diff = SpecDecodeStats(self.max_k)
        diff.num_verifications = self.num_verifications - earlier.num_verifications
        diff.num_draft_tokens = self.num_draft_tokens - earlier.num_draft_tokens
        diff.num_accepted_tokens = self.num_accepted_tokens - earlier.num_accepted_tokens
        for i in range(self.max_k):
            diff.proposed_per_position[i] = (
                self.proposed_per_position[i] - earlier.proposed_per_position[i]
            )
            diff.accepted_per_position[i] = (
                self.accepted_per_position[i] - earlier.accepted_per_position[i]
            )
        return diff

    def summary(self) -> str:
        """One line for benchmark reports."""
        return (
            f"drafts: {self.num_draft_tokens} proposed in {self.num_verifications} "
            f"verifications, acceptance {self.acceptance_rate:.2f}, mean accepted length "
            f"{self.mean_accepted_length:.2f}, per position "
            + ", ".join(f"{r:.2f}" for r in self.position_rates())
        )
