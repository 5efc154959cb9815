# shellcheck shell=bash
# SeaweedFS's STS role for the storage layer's `session` mode (sourced by testbed/up, never run).
#
# SeaweedFS 4.48 defines roles only in its advanced IAM configuration file (`weed mini
# -s3.iam.config=FILE`); its IAM API answers CreateRole with NotImplemented. This file writes
# that configuration: one role, bulkhead-tenant-sessions, which the admin identity of s3.json
# may assume (sts:AssumeRole on the S3 port). A session gets the role's permissions (object
# actions on every bucket, ListBucket on every bucket) intersected with the session policy the
# operator passes to AssumeRole: the session policy is what scopes a session to one prefix.
#
# The STS signing key is made once and kept in the testbed directory, so that sessions issued
# before SeaweedFS restarts stay valid after it (the tests restart it).
#
# Users, access keys and managed policies created through the IAM API, and the admin identity
# of s3.json, work as before with this file in place.

SEAWEED_STS_ROLE=bulkhead-tenant-sessions
SEAWEED_STS_ACCOUNT=000000000000

seaweed_sts_config() { printf '%s/seaweedfs/iam.json' "$TB_DIR"; }
seaweed_sts_role_arn() { printf 'arn:aws:iam::%s:role/%s' "$SEAWEED_STS_ACCOUNT" "$SEAWEED_STS_ROLE"; }

# seaweed_sts_flag: the argument launch_seaweedfs adds to `weed mini`.
seaweed_sts_flag() { printf -- '-s3.iam.config=%s' "$(seaweed_sts_config)"; }

# prepare_seaweed_sts: writes the IAM configuration; the signing key only the first time.
prepare_seaweed_sts() {
	local d=$TB_DIR/seaweedfs key=$TB_DIR/seaweedfs/sts-signing.key file tmp signing
	file=$(seaweed_sts_config)
	tmp=$file.tmp
	mkdir -p "$d"
	chmod 700 "$d"
	if [[ ! -s $key ]]; then
		(
			umask 077
			openssl rand -base64 32 >"$key.tmp"
		)
		mv -f "$key.tmp" "$key"
	fi
	signing=$(tr -d '\n' <"$key")
	(
		umask 077
		cat >"$tmp" <<EOF
{
  "sts": {
    "tokenDuration": "1h",
    "maxSessionLength": "12h",
    "issuer": "seaweedfs-sts",
    "signingKey": "$signing"
  },
  "policy": {"defaultEffect": "Deny"},
  "roles": [
    {
      "roleName": "$SEAWEED_STS_ROLE",
      "roleArn": "$(seaweed_sts_role_arn)",
      "trustPolicy": {
        "Version": "2012-10-17",
        "Statement": [{
          "Effect": "Allow",
          "Principal": {"AWS": "arn:aws:iam::$SEAWEED_STS_ACCOUNT:user/admin"},
          "Action": ["sts:AssumeRole"]
        }]
      },
      "attachedPolicies": ["$SEAWEED_STS_ROLE"],
      "description": "storage session mode: every organization's session, scoped by its session policy"
    }
  ],
  "policies": [
    {
      "name": "$SEAWEED_STS_ROLE",
      "document": {
        "Version": "2012-10-17",
        "Statement": [
          {
            "Effect": "Allow",
            "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject",
              "s3:GetObjectTagging", "s3:PutObject", "s3:PutObjectTagging"],
            "Resource": ["arn:aws:s3:::*/*"]
          },
          {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": ["arn:aws:s3:::*"]}
        ]
      }
    }
  ]
}
EOF
	)
	mv -f "$tmp" "$file"
}

# seaweed_sts_running: the running SeaweedFS was started with the configuration (one started
# by an older testbed/up was not, and is started again).
seaweed_sts_running() {
	local pid
	pid=$(tb_pid seaweedfs)
	[[ -n $pid && -r /proc/$pid/cmdline ]] &&
		tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "$(seaweed_sts_flag)"
}
