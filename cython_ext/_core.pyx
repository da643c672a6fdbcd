# cython: language_level=3, boundscheck=False, wraparound=False
"""gpff._core: Python binding of the gpff C++ inference core (plugin/core).

SGDMLModel(path) loads a `.gpff` sGDML model (docs/model_file.md) and evaluates energy, forces and
virial of one molecule. Units: positions Å, energy in the model's energy unit (`energy_unit`,
"kcal/mol" or "eV"), forces energy/Å, virial energy. The ASE calculator (gpff.calculator)
converts to eV.

Errors: a file that cannot be loaded raises gpff.errors.ModelFileError (message: "<path>:
<problem>"); a positions array with the wrong number of atoms raises gpff.errors.SpeciesError,
any other wrong shape, non-finite positions or coincident atoms raise ValueError.
"""

import os

import numpy as np

from libcpp.string cimport string
from libcpp.vector cimport vector

from gpff.errors import ModelFileError, SpeciesError

cdef extern from "sgdml.h" nogil:
    cdef cppclass CSGDMLModel "gpff::SGDMLModel":
        int n_atoms()
        const vector[int] &atomic_numbers()
        const vector[string] &species()
        const string &energy_unit()
        double molecule_extent()
        int n_perms()
        int n_train()
        double sigma()
        const string &kernel()
        double descriptor_exponent()
        bint has_energy_coefficients()
        double integration_constant()
        const string &path()
        double flops_per_call()
        @staticmethod
        const char *kernel_isa()

# Exception-free wrappers: every C++ exception is caught here and turned into a status code and
# a message, so that they can run without the GIL and nothing escapes into Python uncaught.
cdef extern from *:
    """
    #include <new>
    #include <string>
    #include "sgdml.h"

    /* status: 0 ok, 1 gpff::Error, 2 out of memory, 3 other C++ exception */
    static gpff::SGDMLModel *gpff_core_load(const std::string &path, int *status,
                                            std::string *message) noexcept
    {
      *status = 0;
      try {
        return new gpff::SGDMLModel(path);
      } catch (const gpff::Error &e) {
        *status = 1; *message = e.what();
      } catch (const std::bad_alloc &) {
        *status = 2; *message = path + ": out of memory while loading the model";
      } catch (const std::exception &e) {
        *status = 3; *message = path + ": " + e.what();
      } catch (...) {
        *status = 3; *message = path + ": unknown C++ exception";
      }
      return nullptr;
    }

    static double gpff_core_compute(const gpff::SGDMLModel *model, const double *x, double *f,
                                    double *virial, int *status, std::string *message) noexcept
    {
      *status = 0;
      try {
        return model->compute(x, f, virial, nullptr);
      } catch (const gpff::Error &e) {
        *status = 1; *message = e.what();
      } catch (const std::bad_alloc &) {
        *status = 2; *message = "out of memory";
      } catch (const std::exception &e) {
        *status = 3; *message = e.what();
      } catch (...) {
        *status = 3; *message = "unknown C++ exception";
      }
      return 0.0;
    }
    """
    CSGDMLModel *gpff_core_load(const string &path, int *status, string *message) nogil
    double gpff_core_compute(const CSGDMLModel *model, const double *x, double *f, double *virial,
                             int *status, string *message) nogil


cdef str _text(const string &s):
    return s.decode("utf-8", "replace")


def kernel_isa() -> str:
    """SIMD kernel of the C++ core chosen for this CPU: "avx512", "avx2" or "baseline"
    (GPFF_KERNEL=baseline|avx2 in the environment, read once per process, forces a narrower one)."""
    cdef const char *name = CSGDMLModel.kernel_isa()
    return name.decode("ascii")


cdef class SGDMLModel:
    """An sGDML model loaded from a `.gpff` file by the C++ core.

    SGDMLModel(path): path is a str or os.PathLike. Raises gpff.errors.ModelFileError when the
    file is missing, truncated, corrupted, of another format_version or not an sgdml model.
    """

    cdef CSGDMLModel *_model

    def __cinit__(self, path):
        cdef string cpath = os.fsencode(path)
        cdef int status = 0
        cdef string message
        with nogil:
            self._model = gpff_core_load(cpath, &status, &message)
        if status == 2:
            raise MemoryError(_text(message))
        if status != 0 or self._model == NULL:
            raise ModelFileError(_text(message))

    def __dealloc__(self):
        del self._model

    @property
    def path(self) -> str:
        """The file the model was loaded from."""
        cdef bytes p = self._model.path()
        return os.fsdecode(p)

    @property
    def n_atoms(self) -> int:
        """N, number of atoms of the molecule."""
        return self._model.n_atoms()

    @property
    def atomic_numbers(self) -> list:
        """Atomic numbers (N), model atom order."""
        return list(self._model.atomic_numbers())

    @property
    def species(self) -> list:
        """Element symbols (N), model atom order."""
        cdef vector[string] names = self._model.species()
        return [_text(name) for name in names]

    @property
    def energy_unit(self) -> str:
        """Energy unit of energies, forces (per Å) and virials: "kcal/mol" or "eV"."""
        return _text(self._model.energy_unit())

    @property
    def molecule_extent(self) -> float:
        """Largest interatomic distance in the training geometries, Å."""
        return self._model.molecule_extent()

    @property
    def n_perms(self) -> int:
        """S, number of permutational symmetries."""
        return self._model.n_perms()

    @property
    def n_train(self) -> int:
        """M, number of training geometries."""
        return self._model.n_train()

    @property
    def sigma(self) -> float:
        """Kernel length scale sigma (descriptor units, Å^-p)."""
        return self._model.sigma()

    @property
    def kernel(self) -> str:
        """Kernel of the descriptor distance: "matern52" or "rbf"."""
        return _text(self._model.kernel())

    @property
    def descriptor_exponent(self) -> float:
        """p of the inverse-distance descriptor x_ij = 1/r_ij^p (1 when the file omits it)."""
        return self._model.descriptor_exponent()

    @property
    def has_energy_coefficients(self) -> bool:
        """Whether the model has energy coefficients beta_m (tensor alpha_E: trained with
        energies); without them beta = 0."""
        return self._model.has_energy_coefficients()

    @property
    def integration_constant(self) -> float:
        """Integration constant c, energy unit."""
        return self._model.integration_constant()

    @property
    def flops_per_call(self) -> float:
        """Nominal flop count of one compute() call, M*S*(10*D + 40) (benchmarks)."""
        return self._model.flops_per_call()

    def compute(self, positions):
        """Energy, forces and virial of one molecule.

        positions: array-like (N, 3) float, Å, model atom order (any origin, unwrapped).
        Returns (energy: float, forces: ndarray (N, 3), virial: ndarray (6,)), in the model's
        energy unit (forces per Å); virial W = sum_i r_i (x) F_i, order xx yy zz xy xz yz.
        Raises SpeciesError for a wrong number of atoms, ValueError for any other wrong shape,
        non-finite positions or coincident atoms. Runs without the GIL.
        """
        cdef int n = self._model.n_atoms()
        arr = np.ascontiguousarray(positions, dtype=np.float64)
        if arr.ndim == 2 and arr.shape[1] == 3 and arr.shape[0] != n:
            raise SpeciesError(
                f"{self.path}: positions have {arr.shape[0]} atoms, the model has {n}: "
                f"expected shape ({n}, 3)")
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] != 3:
            raise ValueError(f"positions must have shape ({n}, 3), got {arr.shape}")
        forces = np.empty((n, 3), dtype=np.float64)
        virial = np.empty(6, dtype=np.float64)
        cdef const double[:, ::1] x = arr
        cdef double[:, ::1] f = forces
        cdef double[::1] w = virial
        cdef int status = 0
        cdef string message
        cdef double energy
        with nogil:
            energy = gpff_core_compute(self._model, &x[0, 0], &f[0, 0], &w[0], &status, &message)
        if status == 2:
            raise MemoryError(_text(message))
        if status != 0:
            raise ValueError(_text(message))
        return energy, forces, virial
