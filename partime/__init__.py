import importlib.metadata

from ._diagnose import diagnose as diagnose, Diagnosis as Diagnosis
from ._fixed_point import fixed_point_solve as fixed_point_solve
from ._jacobian import (
    AbstractJacobian as AbstractJacobian,
    BlockDiagonal as BlockDiagonal,
    Dense as Dense,
    Diagonal as Diagonal,
)
from ._lds import (
    AbstractTransition as AbstractTransition,
    BlockDiagonalTransition as BlockDiagonalTransition,
    DenseTransition as DenseTransition,
    DiagonalTransition as DiagonalTransition,
    IdentityTransition as IdentityTransition,
    sequential_solve as sequential_solve,
    ZeroTransition as ZeroTransition,
)
from ._method.base import (
    AbstractDampedMethod as AbstractDampedMethod,
    AbstractMethod as AbstractMethod,
)
from ._method.elk import ELK as ELK, QuasiELK as QuasiELK
from ._method.jacobi import Jacobi as Jacobi
from ._method.newton import Newton as Newton
from ._method.picard import Picard as Picard
from ._method.quasi_newton import QuasiNewton as QuasiNewton
from ._operator import (
    BidiagonalOperator as BidiagonalOperator,
    ScanSolver as ScanSolver,
)
from ._scan import scan as scan
from ._solver import (
    ParallelSolver as ParallelSolver,
    ParallelSolverState as ParallelSolverState,
)
from ._stats import RESULTS as RESULTS, Stats as Stats
from ._window_controller import (
    WindowController as WindowController,
    WindowState as WindowState,
)
from ._window_interpolation import inner_grid as inner_grid


try:
    __version__ = importlib.metadata.version("partime")
except importlib.metadata.PackageNotFoundError:
    # A source checkout on `PYTHONPATH`, not installed (e.g. copied to a GPU machine).
    __version__ = "0+unknown"
