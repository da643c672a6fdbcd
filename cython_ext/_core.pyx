# cython: language_level=3, boundscheck=False, wraparound=False
"""gpff._core: Python binding of the gpff C++ inference core (plugin/core).

SGDMLModel(path) loads a `.gpff` sGDML model (docs/model_file.md) and evaluates energy, forces and
virial of one molecule. MFFModel(path) loads a mapped force field (docs/mff.md) and evaluates
energy, per-atom energies, forces and virials of any configuration from a neighbour list.
Units: positions Å, energy in the model's energy unit (`energy_unit`, "kcal/mol" or "eV"),
forces energy/Å, virial energy. The ASE calculator (gpff.calculator) converts to eV.

Errors: a file that cannot be loaded raises gpff.errors.ModelFileError (message: "<path>:
<problem>"); a positions array with the wrong number of atoms raises gpff.errors.SpeciesError,
any other wrong shape, non-finite positions or coincident atoms raise ValueError.
"""

import os

import numpy as np

from libc.stdint cimport int32_t, int64_t
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
        const string &descriptor()
        int n_desc()
        double descriptor_exponent()
        bint has_energy_coefficients()
        double integration_constant()
        const string &path()
        double flops_per_call()
        @staticmethod
        const char *kernel_isa()

cdef extern from "mff.h" nogil:
    cdef cppclass CMFFModel "gpff::MFFModel":
        const string &path()
        const vector[string] &species()
        int n_species()
        int order()
        double cutoff()
        double cutoff_3body()
        double cutoff_width()
        bint has_embedding()
        double density_decay()
        double max_cutoff()
        const string &energy_unit()
        const vector[double] &energy_offsets()
        int64_t n_coefficients()
        @staticmethod
        const char *kernel_isa()

# Exception-free wrappers: every C++ exception is caught here and turned into a status code and
# a message, so that they can run without the GIL and nothing escapes into Python uncaught.
cdef extern from *:
    """
    #include <new>
    #include <string>
    #include "mff.h"
    #include "sgdml.h"

    /* status of the C++ exception being handled (call it in a catch block): 1 gpff::Error, 2 out
       of memory, 3 other C++ exception; the message of the last two starts with `prefix`, an
       out-of-memory one is prefix + oom */
    static void gpff_core_status(const std::string &prefix, const char *oom, int *status,
                                 std::string *message) noexcept
    {
      try {
        throw;
      } catch (const gpff::Error &e) {
        *status = 1; *message = e.what();
      } catch (const std::bad_alloc &) {
        *status = 2; *message = prefix + oom;
      } catch (const std::exception &e) {
        *status = 3; *message = prefix + e.what();
      } catch (...) {
        *status = 3; *message = prefix + "unknown C++ exception";
      }
    }

    /* *model: the model loaded from path, nullptr on failure; status: 0 ok, else as
       gpff_core_status; messages "<path>: <problem>" */
    template <class Model>
    static void gpff_core_load(const std::string &path, Model **model, int *status,
                               std::string *message) noexcept
    {
      *status = 0;
      *model = nullptr;
      try {
        *model = new Model(path);
      } catch (...) {
        gpff_core_status(path + ": ", "out of memory while loading the model", status, message);
      }
    }

    static double gpff_sgdml_compute(const gpff::SGDMLModel *model, const double *x, double *f,
                                     double *virial, int *status, std::string *message) noexcept
    {
      *status = 0;
      try {
        return model->compute(x, f, virial, nullptr);
      } catch (...) {
        gpff_core_status("", "out of memory", status, message);
      }
      return 0.0;
    }

    static double gpff_mff_compute(const gpff::MFFModel *model, int64_t n_atoms,
                                   const int32_t *species, int64_t n_pairs, const int64_t *i,
                                   const int64_t *j, const double *d, double *energies,
                                   double *forces, double *virial, double *atom_virial,
                                   int *status, std::string *message) noexcept
    {
      *status = 0;
      try {
        return model->compute(n_atoms, species, n_pairs, i, j, d, energies, forces, virial,
                              atom_virial);
      } catch (...) {
        gpff_core_status("", "out of memory", status, message);
      }
      return 0.0;
    }
    """
    void gpff_core_load[M](const string &path, M **model, int *status, string *message) nogil
    double gpff_sgdml_compute(const CSGDMLModel *model, const double *x, double *f,
                              double *virial, int *status, string *message) nogil
    double gpff_mff_compute(const CMFFModel *model, int64_t n_atoms, const int32_t *species,
                            int64_t n_pairs, const int64_t *i, const int64_t *j, const double *d,
                            double *energies, double *forces, double *virial,
                            double *atom_virial, int *status, string *message) nogil


cdef str _text(const string &s):
    return s.decode("utf-8", "replace")


cdef list _texts(vector[string] names):
    return [_text(name) for name in names]


cdef int _check_status(int status, const string &message, error) except -1:
    """Raise for a failed call of a wrapper above: MemoryError (status 2), else `error`."""
    if status == 2:
        raise MemoryError(_text(message))
    if status != 0:
        raise error(_text(message))
    return 0


ctypedef fused CModel:
    CSGDMLModel
    CMFFModel


cdef CModel *_load(CModel *kind, path) except NULL:
    """The model of type CModel (kind: a NULL pointer of that type) loaded from `path` (str or
    os.PathLike), without the GIL; raises ModelFileError (MemoryError) when it cannot be."""
    cdef string cpath = os.fsencode(path)
    cdef int status = 0
    cdef string message
    cdef CModel *model = NULL
    with nogil:
        gpff_core_load(cpath, &model, &status, &message)
    _check_status(status, message, ModelFileError)
    return model


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
        self._model = _load(<CSGDMLModel *> NULL, path)

    def __dealloc__(self):
        del self._model

    @property
    def path(self) -> str:
        """The file the model was loaded from."""
        return os.fsdecode(self._model.path())

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
        return _texts(self._model.species())

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
        """Kernel length scale sigma (descriptor units: Å^-p for the inverse distance)."""
        return self._model.sigma()

    @property
    def kernel(self) -> str:
        """Kernel of the descriptor distance: "matern52" or "rbf"."""
        return _text(self._model.kernel())

    @property
    def descriptor(self) -> str:
        """Descriptor of the molecule: "inverse_distance" or "fchl19" (global FCHL19)."""
        return _text(self._model.descriptor())

    @property
    def n_desc(self) -> int:
        """D, number of descriptor entries: N(N-1)/2 (inverse distance), N*nrep (fchl19)."""
        return self._model.n_desc()

    @property
    def descriptor_exponent(self) -> float:
        """p of the inverse-distance descriptor x_ij = 1/r_ij^p (1 when the file omits it, and
        for the fchl19 descriptor, which has none)."""
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
        non-finite positions, coincident atoms or (fchl19 descriptor) three collinear atoms
        within the three-body cutoff. Runs without the GIL.
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
            energy = gpff_sgdml_compute(self._model, &x[0, 0], &f[0, 0], &w[0], &status,
                                        &message)
        _check_status(status, message, ValueError)
        return energy, forces, virial


# ---- mapped force fields (docs/mff.md) ----------------------------------------------------------

cdef class MFFModel:
    """A mapped force field (model kind "mff", docs/mff.md) loaded from a `.gpff` file by the C++
    core: local 2-body (+ 3-body) energies from B-spline tables, any number of atoms, periodic
    or not.

    MFFModel(path): path is a str or os.PathLike. Raises gpff.errors.ModelFileError when the file
    is missing, truncated, corrupted, of another format_version, not an mff model, or has a
    missing, misshapen or non-finite table or an invalid cutoff, order or species list.
    """

    cdef CMFFModel *_model

    def __cinit__(self, path):
        self._model = _load(<CMFFModel *> NULL, path)

    def __dealloc__(self):
        del self._model

    @property
    def path(self) -> str:
        """The file the model was loaded from."""
        return os.fsdecode(self._model.path())

    @property
    def species(self) -> list:
        """Element symbols in model species order (the species index of compute())."""
        return _texts(self._model.species())

    @property
    def order(self) -> int:
        """2 (2-body) or 3 (2-body + 3-body)."""
        return self._model.order()

    @property
    def cutoff(self) -> float:
        """r_c of the 2-body term, Å."""
        return self._model.cutoff()

    @property
    def cutoff_3body(self):
        """r_c3 of the 3-body term, Å; None for an order-2 model."""
        return self._model.cutoff_3body() if self._model.order() == 3 else None

    @property
    def cutoff_width(self) -> float:
        """Transition width d of the cutoff function, Å."""
        return self._model.cutoff_width()

    @property
    def density_decay(self):
        """β of the embedding density ρ_i = Σ_j f_c(r_ij) exp(-β r_ij), 1/Å; None for a model
        without the embedding term."""
        return self._model.density_decay() if self._model.has_embedding() else None

    @property
    def max_cutoff(self) -> float:
        """max(r_c, r_c3), Å: the cutoff of the neighbour list compute() needs."""
        return self._model.max_cutoff()

    @property
    def energy_unit(self) -> str:
        """Energy unit of energies, forces (per Å) and virials: "eV" or "kcal/mol"."""
        return _text(self._model.energy_unit())

    @property
    def units(self) -> dict:
        """{"energy": energy_unit, "length": "Angstrom"}."""
        return {"energy": self.energy_unit, "length": "Angstrom"}

    @property
    def energy_offsets(self):
        """One-body energies e0 per species (ndarray (S,), energy unit)."""
        cdef vector[double] e0 = self._model.energy_offsets()
        return np.array([e0[k] for k in range(e0.size())], dtype=np.float64)

    @property
    def n_coefficients(self) -> int:
        """Total number of B-spline coefficients of all tables."""
        return self._model.n_coefficients()

    @staticmethod
    def kernel_isa() -> str:
        """SIMD variant of the mff evaluation kernel chosen for this CPU: "avx2" or "baseline"
        (GPFF_KERNEL=baseline in the environment, read once per process, forces baseline)."""
        cdef const char *name = CMFFModel.kernel_isa()
        return name.decode("ascii")

    def compute(self, species_index, i, j, d):
        """Energy, per-atom energies, forces and virials of one configuration.

        species_index: (N,) ints, model species index of each atom (see `species`).
        i, j: (P,) ints, the neighbour list: centre atom i and neighbour atom j of each entry,
            sorted by i (j may equal i: an image of the centre), e.g. from
            ase.neighborlist.neighbor_list("ijD", atoms, model.max_cutoff).
        d: (P, 3) float, Å, d = r_j (image) - r_i of each entry. Entries beyond max_cutoff are
            ignored; the list must hold every neighbour within max_cutoff.
        Returns (energy: float, energies: (N,), forces: (N, 3), virial: (6,),
            atom_virial: (N, 6)) in the model's energy unit (forces per Å). energies are
            e0 + local energies; virial W = sum of d (x) f over the terms, order xx yy zz xy xz
            yz (-W/V is the stress of a periodic cell); atom_virial splits each term half/half
            between its two atoms (as LAMMPS' compute stress/atom does) and sums to virial.
        Raises SpeciesError for a species index out of range, ValueError for wrong shapes,
        indices out of range, an unsorted list, non-finite displacements or coincident atoms.
        Runs without the GIL.
        """
        sp = np.ascontiguousarray(species_index)
        ii = np.ascontiguousarray(i)
        jj = np.ascontiguousarray(j)
        dd = np.ascontiguousarray(d, dtype=np.float64)
        if sp.ndim != 1:
            raise ValueError(f"species_index must have shape (N,), got {sp.shape}")
        if ii.ndim != 1 or jj.ndim != 1 or ii.shape[0] != jj.shape[0]:
            raise ValueError(f"i and j must have the same shape (P,), got {ii.shape} and {jj.shape}")
        if dd.ndim != 2 or dd.shape[1] != 3 or dd.shape[0] != ii.shape[0]:
            raise ValueError(f"d must have shape ({ii.shape[0]}, 3), got {dd.shape}")
        for name, arr in (("species_index", sp), ("i", ii), ("j", jj)):
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
        cdef int n_sp = self._model.n_species()
        if sp.size and (sp.min() < 0 or sp.max() >= n_sp):
            raise SpeciesError(
                f"{self.path}: species_index must be in 0..{n_sp - 1} (model species "
                f"{', '.join(self.species)}), got values in {sp.min()}..{sp.max()}")
        sp = sp.astype(np.int32, copy=False)
        ii = ii.astype(np.int64, copy=False)
        jj = jj.astype(np.int64, copy=False)
        cdef int64_t n = sp.shape[0]
        cdef int64_t p = ii.shape[0]
        energies = np.empty(n, dtype=np.float64)
        forces = np.empty((n, 3), dtype=np.float64)
        virial = np.empty(6, dtype=np.float64)
        atom_virial = np.empty((n, 6), dtype=np.float64)
        # one dummy element keeps every pointer valid for N = 0 or P = 0
        cdef int32_t[::1] csp = sp if n else np.zeros(1, dtype=np.int32)
        cdef int64_t[::1] ci = ii if p else np.zeros(1, dtype=np.int64)
        cdef int64_t[::1] cj = jj if p else np.zeros(1, dtype=np.int64)
        cdef const double[:, ::1] cd = dd if p else np.zeros((1, 3), dtype=np.float64)
        cdef double[::1] ce = energies if n else np.zeros(1)
        cdef double[:, ::1] cf = forces if n else np.zeros((1, 3))
        cdef double[::1] cw = virial
        cdef double[:, ::1] cav = atom_virial if n else np.zeros((1, 6))
        cdef int status = 0
        cdef string message
        cdef double energy
        with nogil:
            energy = gpff_mff_compute(self._model, n, &csp[0], p, &ci[0], &cj[0], &cd[0, 0],
                                      &ce[0], &cf[0, 0], &cw[0], &cav[0, 0], &status, &message)
        _check_status(status, message, ValueError)
        return energy, energies, forces, virial, atom_virial
