"""The phantom world: procedurally drawn chest radiographs with known ground truth.

``attributes`` samples a study (demographics, labels, severities, PE, grade, tabular vector),
``render`` draws its views, ``reports`` writes its report, ``world`` assembles dataset records
and in-memory arrays, ``prior_pairs`` gives paired CTPA embeddings and writes the prior's npz.
The renderer is imported lazily.
"""
from cxrjax.data.phantoms.attributes import (PATHOLOGIES, RACES, PhantomConfig, num_patients, patient_of,
                                             sample_study, split_of_patient)
from cxrjax.data.phantoms.prior_pairs import paired_embeddings, write_prior_npz
from cxrjax.data.phantoms.reports import write_report
from cxrjax.data.phantoms.study import StudyAttributes
from cxrjax.data.phantoms.world import MAX_VIEWS, make_arrays, make_example, render_study

__all__ = ["PATHOLOGIES", "RACES", "PhantomConfig", "num_patients", "patient_of", "sample_study",
           "split_of_patient", "paired_embeddings", "write_prior_npz", "write_report", "StudyAttributes", "MAX_VIEWS",
           "make_arrays", "make_example", "render_study"]
