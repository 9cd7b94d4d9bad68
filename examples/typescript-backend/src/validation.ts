// Runtime checks against the project's JSON Schemas (draft 2020-12), so a bad request is refused
// here, with every problem listed, instead of failing in the worker.
import { Ajv2020, type ErrorObject, type ValidateFunction } from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import type { TrainingRequest } from './generated/training-request.js';
import type { UserWebhookBody } from './generated/user-webhook.js';
import { trainingRequestSchema, userWebhookSchema } from './generated/json-schemas.js';

const ajv = new Ajv2020({ allErrors: true, strict: true });
addFormats(ajv);
// pydantic writes OpenAPI's `discriminator` next to `oneOf`: an annotation, oneOf decides.
ajv.addKeyword({ keyword: 'discriminator', schemaType: 'object' });

export type Checked<T> = { ok: true; value: T } | { ok: false; problems: string[] };

function checker<T>(validate: ValidateFunction): (value: unknown) => Checked<T> {
  return (value) =>
    validate(value)
      ? { ok: true, value: value as T }
      : { ok: false, problems: describe(validate.errors ?? []) };
}

/** One line per problem: where (a JSON pointer, `/` for the top) and what. */
function describe(errors: ErrorObject[]): string[] {
  const lines = errors.map((e) => {
    const where = e.instancePath || '/';
    if (e.keyword === 'additionalProperties') {
      return `${where}: unknown field ${JSON.stringify(e.params.additionalProperty)}`;
    }
    if (e.keyword === 'enum')
      return `${where}: must be one of ${e.params.allowedValues.map(String).join(', ')}`;
    return `${where}: ${e.message ?? e.keyword}`;
  });
  return [...new Set(lines)];
}

/**
 * `schema` without its `additionalProperties: false`: a body may carry fields added to the
 * contract after this backend was built (an additive change), and must not be refused for them.
 */
function tolerant(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(tolerant);
  if (schema === null || typeof schema !== 'object') return schema;
  return Object.fromEntries(
    Object.entries(schema)
      .filter(([key, value]) => !(key === 'additionalProperties' && value === false))
      .map(([key, value]) => [key, tolerant(value)]),
  );
}

/** Requests are input from browsers: every field must be one the worker knows. */
export const checkTrainingRequest = checker<TrainingRequest>(ajv.compile(trainingRequestSchema));
/** Webhooks come from the worker, which may be newer than this backend. */
export const checkUserWebhook = checker<UserWebhookBody>(
  ajv.compile(tolerant(userWebhookSchema) as object),
);
