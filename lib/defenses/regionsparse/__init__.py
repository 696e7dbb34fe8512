"""RegionSparse (Zhang et al., IJCNN 2020, paper 002): sparse-code the located object region, bilateral-filter the
rest.

Offline a global overcomplete patch dictionary is learnt with online dictionary learning (scikit-learn's
MiniBatchDictionaryLearning, Mairal et al. 2009) on non-local-means-smoothed benign images whose patches are
z-scored per image (§2.3). At test time a Sobel Gx - Gy / Otsu / morphology heuristic finds the object box
(§2.4), its patches are OMP-coded with K atoms and put back by overlap averaging (§2.5), and the background gets
a mild bilateral filter (§2.6): RS(x) = M * SC(x) + (1 - M) * BF(x). The ablations of Fig. 4 are flags.

Modules: config (settings, ablations), filters, patches, dictionary, omp (batched OMP), localize, defense
(the Defense), training (dictionary and classifier copies, cached), evaluation (the paper's protocol), selection
(K in the run), factory (`build`), tables (every table and figure of notebook 03).
"""
from lib.defenses.regionsparse.config import VARIANTS, RegionSparseConfig
from lib.defenses.regionsparse.defense import RegionSparse
from lib.defenses.regionsparse.dictionary import dct_dictionary, learn_dictionary, training_patches
from lib.defenses.regionsparse.factory import build, variant_defenses
from lib.defenses.regionsparse.filters import bilateral, nlm_smooth
from lib.defenses.regionsparse.localize import box_mask, localize, localize_batch, localize_steps
from lib.defenses.regionsparse.omp import batch_omp, support_projection
from lib.defenses.regionsparse.patches import extract_patches, fold_patches, zscore_cols
from lib.defenses.regionsparse.selection import SparsitySelection, profile_config, select_sparsity
from lib.defenses.regionsparse.training import trained_copy, trained_dictionary

__all__ = [
    "VARIANTS", "RegionSparse", "RegionSparseConfig", "SparsitySelection", "batch_omp", "bilateral", "box_mask",
    "build", "dct_dictionary", "extract_patches", "fold_patches", "learn_dictionary", "localize", "localize_batch",
    "localize_steps", "nlm_smooth", "profile_config", "select_sparsity", "support_projection", "trained_copy", "trained_dictionary",
    "training_patches", "variant_defenses", "zscore_cols",
]
