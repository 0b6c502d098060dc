"""ALoRA with AB-LoRA scores (docs/method.md sections 3-4): the paper's method.

At every round B_val (|B_val| development examples, drawn with a generator seeded by (seed,
round), the same on every process) is scored by ablation: IS(r) = S(M) - S(M \\ r) + S(M_r).
The engine shares the ablations out over the processes. `naive` and `fast` score every rank
exactly; `screened` estimates every rank from the gates' gradients and scores exactly the ranks
that decide the round (alora_ds.scoring.screened), recording which are which.
"""

from __future__ import annotations

from alora_ds.core.allocation import plan_round, resolve_prune_count
from alora_ds.core.schedule import draw_validation_indices
from alora_ds.io.examples import make_batches
from alora_ds.methods.base import Adapters, Method, RoundInputs, RoundScores
from alora_ds.scoring.direct import Batch
from alora_ds.scoring.screened import ScreenedScores, spearman


class ALoRA(Method):
    name = "alora"
    allocates = True
    scores_by_ablation = True

    def round_scores(self, inputs: RoundInputs) -> RoundScores:
        settings = self.settings
        dev = inputs.dev_examples
        indices = draw_validation_indices(
            len(dev), settings.val_examples, seed=settings.seed, round_index=inputs.round_index
        )
        batches = make_batches(
            [dev[i] for i in indices], settings.scoring_batch_size, inputs.pad_id, inputs.device
        )
        adapters = inputs.adapters
        live = sum(adapters.rank_map().values())
        with inputs.progress(live) as progress:
            if settings.scoring != "screened":
                scores = adapters.ab_lora_scores(
                    batches,
                    mode=settings.scoring,
                    max_rows=settings.scoring_max_rows,
                    progress=progress,
                )
                return RoundScores(scores.importance, scores.S_M)
            n_prune = resolve_prune_count(settings.prune_per_round, live)
            screened = adapters.screened_scores(
                batches,
                n_prune,
                candidates=settings.screen_candidates,
                max_rows=settings.scoring_max_rows,
                progress=progress,
                exact_means=settings.screen_exact_means,
            )
        extra = screened.to_round_fields()
        if settings.screen_verify:
            extra["verify"] = self.verify(adapters, batches, screened, n_prune)
        record = screened.record
        note = f"{record['exact_ranks']} of {record['live_ranks']} ranks scored exactly"
        if settings.screen_verify:
            note += f", pruned set identical to exact: {extra['verify']['identical_pruned']}"
        return RoundScores(screened.importance, screened.S_M, extra, note)

    def verify(
        self, adapters: Adapters, batches: list[Batch], screened: ScreenedScores, n_prune: int
    ) -> dict:
        """The exact scores of every rank beside the screened ones: whether the plans agree."""
        exact = adapters.ab_lora_scores(
            batches, mode="fast", max_rows=self.settings.scoring_max_rows
        ).importance
        ours, theirs = plan_round(screened.importance, n_prune), plan_round(exact, n_prune)
        flat = [(n, i) for n, values in exact.items() for i in range(len(values))]
        return {
            "identical_pruned": ours.pruned == theirs.pruned,
            "identical_added": ours.added == theirs.added,
            "exact_pruned": [list(p) for p in theirs.pruned],
            "spearman_all": spearman(
                [screened.estimates[n][i] for n, i in flat], [exact[n][i] for n, i in flat]
            ),
            "exact_scores": exact,
        }
