// The AWS SDK for JavaScript v3 in a pod: resolves credentials with one provider and calls STS
// GetCallerIdentity against moto with them. Prints one JSON line:
//   {"arn", "accessKeyId", "expiration"} or {"error", "name"} (exit 1).
//
//   node sdk_probe.js default|imds|http
//     default  the client's default chain (fromNodeProviderChain): env, files, then the container
//              endpoint when AWS_CONTAINER_CREDENTIALS_FULL_URI is set, else instance metadata
//     imds     fromInstanceMetadata (IMDSv2, falling back to v1 as the SDK does)
//     http     fromHttp: AWS_CONTAINER_CREDENTIALS_FULL_URI with AWS_CONTAINER_AUTHORIZATION_TOKEN
//              or AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (EKS Pod Identity's provider; the older
//              fromContainerMetadata accepts only loopback hosts in a full URI, so not 169.254.170.23)
//
// Modules come from NODE_PATH (scripts/setup installs them in .build/node).
"use strict";

const { STSClient, GetCallerIdentityCommand } = require("@aws-sdk/client-sts");
const providers = require("@aws-sdk/credential-providers");

const ENDPOINT = process.env.IAMLINK_STS_ENDPOINT || "http://198.18.0.2:5000";

function provider(mode) {
  switch (mode) {
    case "default":
      return undefined;
    case "imds":
      return providers.fromInstanceMetadata({ timeout: 2000, maxRetries: 1 });
    case "http":
      return providers.fromHttp({});
    default:
      throw new Error(`unknown provider ${mode}`);
  }
}

async function main() {
  const client = new STSClient({ region: "us-east-1", endpoint: ENDPOINT, credentials: provider(process.argv[2]) });
  const creds = await client.config.credentials();
  const out = await client.send(new GetCallerIdentityCommand({}));
  return { arn: out.Arn, accessKeyId: creds.accessKeyId, expiration: creds.expiration && creds.expiration.toISOString() };
}

main().then(
  (r) => console.log(JSON.stringify(r)),
  (e) => {
    console.log(JSON.stringify({ error: String(e && e.message), name: e && e.name }));
    process.exitCode = 1;
  },
);
