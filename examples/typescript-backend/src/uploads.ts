// Presigned PUT URLs, so a browser uploads a run's images straight to S3 (never through this
// backend), under the prefix `loratrain train` uses for a folder: uploads/<run id>/.
import { PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import path from 'node:path';
import type { S3Settings } from './config.js';

/** What the worker accepts in a dataset (DESIGN.md): images by their magic bytes, captions. */
export const CONTENT_TYPES: Readonly<Record<string, string>> = {
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.webp': 'image/webp',
  '.txt': 'text/plain; charset=utf-8',
};

export interface Upload {
  name: string;
  key: string;
  method: 'PUT';
  url: string;
  /** Send exactly these with the PUT: they are part of the signature. */
  headers: Record<string, string>;
}

export class UploadRefused extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join('; '));
  }
}

/** Why `names` cannot be a dataset's files (one line each), or nothing. */
export function uploadProblems(names: unknown, maxFiles: number): string[] {
  if (!Array.isArray(names) || names.length === 0) {
    return ['files: give a non-empty list of file names, e.g. ["cat1.png", "cat1.txt"]'];
  }
  if (names.length > maxFiles)
    return [`files: ${names.length} files, more than the limit of ${maxFiles}`];
  const problems: string[] = [];
  const seen = new Set<string>();
  for (const name of names) {
    if (
      typeof name !== 'string' ||
      !/^[^/\\\x00-\x1f\x7f]{1,255}$/.test(name) ||
      name.startsWith('.')
    ) {
      problems.push(`files: ${JSON.stringify(name)} is not a file name (no folders, not hidden)`);
      continue;
    }
    const ext = path.extname(name).toLowerCase();
    if (!(ext in CONTENT_TYPES)) {
      problems.push(`files: ${name}: not a .png/.jpg/.jpeg/.webp image or .txt caption`);
    } else if (seen.has(name)) {
      problems.push(`files: ${name} is listed twice`);
    }
    seen.add(name);
  }
  return problems;
}

export class Uploads {
  private readonly s3: S3Client;

  constructor(
    private readonly settings: S3Settings,
    private readonly ttlS: number,
  ) {
    // Signed for the address the browser uses; S3 checks the host it was signed for.
    const endpoint = settings.publicEndpoint ?? settings.endpoint;
    this.s3 = new S3Client({
      region: settings.region,
      endpoint,
      // MinIO, SeaweedFS and other self-hosted servers: bucket in the path, not the host name.
      forcePathStyle: endpoint !== undefined,
      credentials:
        settings.accessKeyId && settings.secretAccessKey
          ? { accessKeyId: settings.accessKeyId, secretAccessKey: settings.secretAccessKey }
          : undefined,
      // Otherwise the SDK signs a CRC32 of an empty body into the URL and every real upload
      // fails its checksum.
      requestChecksumCalculation: 'WHEN_REQUIRED',
    });
  }

  get bucket(): string {
    return this.settings.bucket;
  }

  static prefixFor(runId: string): string {
    return `uploads/${runId}/`;
  }

  async presign(runId: string, names: string[]): Promise<Upload[]> {
    const prefix = Uploads.prefixFor(runId);
    return Promise.all(
      names.map(async (name) => {
        const key = prefix + name;
        const contentType = CONTENT_TYPES[path.extname(name).toLowerCase()] as string;
        const command = new PutObjectCommand({
          Bucket: this.settings.bucket,
          Key: key,
          ContentType: contentType,
        });
        const url = await getSignedUrl(this.s3, command, { expiresIn: this.ttlS });
        return { name, key, method: 'PUT' as const, url, headers: { 'content-type': contentType } };
      }),
    );
  }
}
