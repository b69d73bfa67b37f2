"""pytest over the notebooks (nbval): a course checker that rejects a solution fails the cell.

The kernels nbval starts inherit this environment; with it set, minimrcnn.course's
checkers raise ExerciseFailed instead of only printing their message.
"""

import os

os.environ.setdefault("MINIMRCNN_COURSE_STRICT", "1")
