// workflow_job deliveries for tests/runners_github.rs, made from GitHub's own examples
// (@octokit/webhooks-examples) with the test's ids, labels and runner, and validated against
// the workflow_job schemas of GitHub's webhook description (@octokit/openapi-webhooks).
//
// stdin: [{"action": "queued"|"in_progress"|"completed", "job_id": N, "run_id": N,
//          "labels": [...], "runner_name": "..."|null, "conclusion": "success"|null}, ...]
// stdout: the payloads, in the same order. Exits 1 when one does not match its schema.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";

const require = createRequire(import.meta.url);
const examples = require("@octokit/webhooks-examples/api.github.com/index.json");
const description = require("@octokit/openapi-webhooks/generated/api.github.com.json");

const ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: true });
addFormats(ajv);
ajv.addSchema({ $id: "gh", components: description.components });

const workflowJob = examples.find((e) => e.name === "workflow_job");
const wanted = JSON.parse(readFileSync(0, "utf8"));
const out = [];
function edit(example, w) {
  const p = structuredClone(example);
  const job = p.workflow_job;
  job.id = w.job_id;
  job.run_id = w.run_id;
  job.labels = w.labels;
  job.status = w.action;
  job.runner_name = w.runner_name ?? null;
  job.runner_id = w.runner_name ? (job.runner_id ?? 1) : null;
  job.runner_group_id = w.runner_name ? (job.runner_group_id ?? 1) : null;
  job.runner_group_name = w.runner_name ? (job.runner_group_name ?? "Default") : null;
  if (w.action === "completed") {
    job.conclusion = w.conclusion ?? "success";
    job.completed_at = job.completed_at ?? new Date().toISOString().replace(/\.\d+Z$/, "Z");
  } else {
    job.conclusion = null;
    job.completed_at = null;
  }
  return p;
}

for (const w of wanted) {
  const name = `webhook-workflow-job-${w.action.replace("_", "-")}`;
  const validate = ajv.getSchema(`gh#/components/schemas/${name}`);
  if (!validate) throw new Error(`no schema ${name}`);
  // The first of GitHub's examples of this action that, edited, matches the schema.
  const errors = [];
  let found = null;
  for (const example of workflowJob.examples.filter((e) => e.action === w.action)) {
    const p = edit(example, w);
    if (validate(p)) {
      found = p;
      break;
    }
    errors.push(ajv.errorsText(validate.errors));
  }
  if (!found) {
    console.error(`${name}: no example matches the schema once edited: ${errors.join(" | ")}`);
    process.exit(1);
  }
  out.push(found);
}
process.stdout.write(JSON.stringify(out));
