// Validate custom resources against their published schemas; run by tests/deploy/test_chart.py.
//
//   node validate.mjs MODELS_DIR MANIFESTS.json
//
// MODELS_DIR is the node_modules folder deploy/tools/install-helm.sh fills from this
// folder's package-lock.json: @kubernetes-models/keda (validators generated from KEDA's
// Go API types, keda.sh/v1alpha1) and @kubernetes-models/prometheus-operator (from
// prometheus-operator's, monitoring.coreos.com/v1). MANIFESTS.json is a JSON array of
// objects. Prints one JSON line per object: {"index", "kind", "ok", "error"}. A kind with
// no validator here is reported as not ok, so nothing passes unchecked. Exit 0 when every
// object is valid, 1 when one is not, 2 on a usage error.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const VALIDATORS = {
  "keda.sh/v1alpha1/ScaledObject": ["@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js", "ScaledObject"],
  "keda.sh/v1alpha1/TriggerAuthentication": [
    "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication.js",
    "TriggerAuthentication",
  ],
  "monitoring.coreos.com/v1/ServiceMonitor": [
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
    "ServiceMonitor",
  ],
};

const [modulesDir, manifestsPath] = process.argv.slice(2);
if (!modulesDir || !manifestsPath) {
  console.error("usage: node validate.mjs MODELS_DIR MANIFESTS.json");
  process.exit(2);
}

const objects = JSON.parse(readFileSync(manifestsPath, "utf8"));
let failed = false;
for (const [index, obj] of objects.entries()) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const entry = VALIDATORS[key];
  let error = null;
  if (!entry) {
    error = `no validator for ${key}`;
  } else {
    const [file, exported] = entry;
    const mod = await import(pathToFileURL(join(modulesDir, file)).href);
    try {
      new mod[exported](obj).validate();
    } catch (e) {
      error = String(e && e.message ? e.message : e);
    }
  }
  failed ||= error !== null;
  console.log(JSON.stringify({ index, kind: key, ok: error === null, error }));
}
process.exit(failed ? 1 : 0);
