//! Database layer against the testbed's PostgreSQL: every probe both ways, repairs, odd names,
//! cleanup, the audit command. Each test works in a database and roles of its own.

mod common;

use common::TestDb;

use std::time::Duration;

use bulkhead::api::DeletionPolicy;
use bulkhead::api::platform::{DatabasePlatform, IsolationPlatformStatus};
use bulkhead::layers::database::{self, DatabaseLayer, KEY_PASSWORD, KEY_URL, KEY_USER};
use bulkhead::layers::{Credentials, Layer, Tenant, Verification};
use bulkhead::tenant::OrgId;
use serde_json::json;
use tokio_postgres::{Client, NoTls};

const SEED: &str = r#"
CREATE TABLE conversations (id bigserial PRIMARY KEY, org_id text NOT NULL, title text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE messages (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, org_id text NOT NULL, conversation_id bigint, body text);
CREATE TABLE agents (id bigserial PRIMARY KEY, org_id text NOT NULL, name text);
CREATE TABLE skills (id bigserial PRIMARY KEY, org_id text NOT NULL, scope text NOT NULL DEFAULT 'org', name text);
CREATE TABLE projects (id bigserial PRIMARY KEY, org_id text NOT NULL, name text);
CREATE TABLE members (id bigserial PRIMARY KEY, org_id text NOT NULL, email text);
CREATE TABLE audit_logs (id bigserial PRIMARY KEY, org_id text NOT NULL, action text, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE files (id bigserial PRIMARY KEY, org_id text NOT NULL, key text);
CREATE TABLE api_keys (id bigserial PRIMARY KEY, org_id text NOT NULL, hash text);
CREATE TABLE embeddings (id bigserial PRIMARY KEY, org_id text NOT NULL, content text, embedding float8[]);
CREATE INDEX ON conversations (org_id, created_at);
CREATE INDEX ON messages (org_id);
CREATE INDEX ON agents (org_id);
CREATE INDEX ON skills (org_id);
CREATE INDEX ON projects (org_id);
CREATE INDEX ON members (org_id);
CREATE INDEX ON audit_logs (org_id);
CREATE INDEX ON files (org_id);
CREATE INDEX ON api_keys (org_id);
CREATE INDEX ON embeddings (org_id);
INSERT INTO skills (org_id, scope, name) VALUES ('bulkhead-sentinel', 'system', 'summarize');
"#;

const TABLES: [&str; 10] = [
    "conversations",
    "messages",
    "agents",
    "skills",
    "projects",
    "members",
    "audit_logs",
    "files",
    "api_keys",
    "embeddings",
];

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

impl TestDb {
    fn spec(&self, extra: serde_json::Value) -> DatabasePlatform {
        let mut base = json!({
            "adminUrlSecretRef": {"name": "pg", "key": "url"},
            "rolePrefix": self.role_prefix,
            "groupRole": self.group,
            "overrides": [{"table": "skills", "sharedReadColumn": "scope", "sharedReadValue": "system"}],
        });
        for (k, v) in extra.as_object().expect("object") {
            base[k] = v.clone();
        }
        serde_json::from_value(base).expect("spec")
    }

    async fn layer(&self, extra: serde_json::Value) -> DatabaseLayer {
        DatabaseLayer::connect(&self.spec(extra), &self.url)
            .await
            .expect("connect layer")
            .with_audit_ttl(Duration::ZERO)
    }
}

fn tenant(org: &OrgId, display: &str, peers: &[&OrgId], policy: DeletionPolicy) -> Tenant {
    Tenant {
        display_name: display.to_owned(),
        ..common::tenant_of(org, "", peers, policy)
    }
}

fn failures(v: &Verification) -> String {
    v.failures().join("\n")
}

fn assert_holds(v: &Verification, who: &str) {
    assert!(
        v.isolated() && v.verified(),
        "{who} should be isolated and verified:\n{}",
        failures(v)
    );
}

/// Asserts that verification fails and that some failing check mentions `needle`.
fn assert_breaks(v: &Verification, needle: &str) {
    let all = v.failures();
    assert!(
        !(v.isolated() && v.verified()),
        "isolation reported as holding, expected {needle:?}"
    );
    assert!(
        all.iter().any(|f| f.contains(needle)),
        "no failure mentions {needle:?}:\n{}",
        all.join("\n")
    );
}

/// Two organizations, both provisioned and each with its canaries.
struct Pair {
    db: TestDb,
    layer: DatabaseLayer,
    a: Tenant,
    b: Tenant,
    ca: Credentials,
    cb: Credentials,
}

async fn pair(extra: serde_json::Value) -> Pair {
    let db = TestDb::create("d", SEED).await;
    let layer = db.layer(extra).await;
    layer.prepare().await.expect("prepare");
    let (oa, ob) = (db.org("acme"), db.org("beta"));
    let a = tenant(&oa, "Acme", &[&ob], DeletionPolicy::Delete);
    let b = tenant(&ob, "Beta", &[&oa], DeletionPolicy::Delete);
    let mut ca = Credentials::default();
    let mut cb = Credentials::default();
    layer.ensure(&a, &mut ca).await.expect("ensure a");
    layer.ensure(&b, &mut cb).await.expect("ensure b");
    Pair {
        db,
        layer,
        a,
        b,
        ca,
        cb,
    }
}

impl Pair {
    async fn verify_a(&self) -> Verification {
        self.layer
            .verify(&self.a, &self.ca)
            .await
            .expect("verify a")
    }
    async fn tenant_client(&self) -> Client {
        connect(self.ca.get(KEY_URL).expect("url")).await
    }
}

#[tokio::test]
async fn prepare_governs_every_table_and_is_idempotent() {
    let db = TestDb::create("d", SEED).await;
    let layer = db.layer(json!({})).await;
    let first = layer.prepare().await.expect("prepare");
    assert_eq!(
        first.len(),
        TABLES.len(),
        "each new table is reported once: {first:?}"
    );
    let again = layer.prepare().await.expect("prepare again");
    assert!(
        again.is_empty(),
        "second prepare repairs nothing: {again:?}"
    );

    let mut status = IsolationPlatformStatus::default();
    layer.platform_status(&mut status).await.expect("status");
    let audit = status.database.expect("database audit");
    assert_eq!(audit.coverage, "10/10");
    assert!(audit.findings.is_empty(), "{:?}", audit.findings);

    let admin = db.admin().await;
    for t in TABLES {
        let row = admin
            .query_one(
                "SELECT relrowsecurity, relforcerowsecurity, (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid)
                 FROM pg_class c WHERE oid = ('public.' || $1)::regclass",
                &[&t],
            )
            .await
            .unwrap();
        let policies: i64 = row.get(2);
        assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1), "{t}");
        assert_eq!(policies, if t == "skills" { 2 } else { 1 }, "{t}");
    }
    // The sentinel's registry row and canaries are in place.
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM organizations WHERE id = 'bulkhead-sentinel'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM messages WHERE org_id = 'bulkhead-sentinel'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // The group role holds the privileges; no per-organization grant exists.
    let acl: String = admin
        .query_one(
            "SELECT relacl::text FROM pg_class WHERE relname = 'messages'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(acl.contains(&db.group), "{acl}");
    assert!(!acl.contains(&db.role_prefix), "{acl}");
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn probes_pass_when_isolation_holds() {
    let p = pair(json!({})).await;
    let va = p.verify_a().await;
    assert_holds(&va, "acme");
    let vb = p.layer.verify(&p.b, &p.cb).await.expect("verify b");
    assert_holds(&vb, "beta");
    let names: Vec<&str> = va.probes.iter().map(|x| x.name.as_str()).collect();
    for want in [
        "log in as",
        "identity of",
        "read other organizations' rows in public.messages",
        "read own rows in public.messages",
        "insert own row into public.messages",
        "insert into public.messages as bulkhead-sentinel",
        "update bulkhead-sentinel's rows in public.messages",
        "delete bulkhead-sentinel's rows in public.messages",
        "disable row-level security on public.messages",
        "drop the policy of public.messages",
        "set role",
        "read rows as the group role",
        "spoof the identity setting as",
        "similarity search over public.embeddings",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "no probe {want:?} in {names:?}"
        );
    }
    // Shared skills are readable by all, writable by none.
    let c = p.tenant_client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM skills WHERE scope = 'system'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let n = c
        .execute(
            "UPDATE skills SET name = 'mine' WHERE scope = 'system'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 0);
    let n = c
        .execute("DELETE FROM skills WHERE scope = 'system'", &[])
        .await
        .unwrap();
    assert_eq!(n, 0);
    let err = c
        .execute(
            "INSERT INTO skills (scope, name) VALUES ('system', 'evil')",
            &[],
        )
        .await
        .unwrap_err();
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("row-level security"), "{err:?}");
    // Inserts are stamped with the caller's org.
    let org: String = c
        .query_one(
            "INSERT INTO conversations (title) VALUES ('hi') RETURNING org_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(org, p.a.org_id.as_str());
    drop(c);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

/// Breaks isolation as the admin behind the operator's back, checks that verification sees
/// it, then that `prepare` (or `ensure`) repairs it and verification passes again.
async fn break_and_repair(sql: &str, needle: &str, repaired_by_ensure: bool) {
    let mut p = pair(json!({})).await;
    assert_holds(&p.verify_a().await, "before the breach");
    let admin = p.db.admin().await;
    let sql = sql
        .replace("{A}", &p.layer.role_of(&p.a.org_id))
        .replace("{B}", &p.layer.role_of(&p.b.org_id))
        .replace("{G}", &p.db.group);
    admin
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("breach {sql}: {e}"));
    assert_breaks(&p.verify_a().await, needle);
    let repairs = if repaired_by_ensure {
        p.layer.ensure(&p.a, &mut p.ca).await.expect("ensure")
    } else {
        p.layer.prepare().await.expect("prepare")
    };
    assert!(!repairs.is_empty(), "the repair is reported");
    assert_holds(&p.verify_a().await, "after the repair");
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn disabled_rls_is_found_and_repaired() {
    break_and_repair(
        "ALTER TABLE messages DISABLE ROW LEVEL SECURITY",
        "read other organizations' rows in public.messages",
        false,
    )
    .await;
}

#[tokio::test]
async fn dropped_force_is_found_and_repaired() {
    break_and_repair(
        "ALTER TABLE files NO FORCE ROW LEVEL SECURITY",
        "row-level security is not forced",
        false,
    )
    .await;
}

#[tokio::test]
async fn dropped_policy_is_found_and_repaired() {
    break_and_repair(
        "DROP POLICY bulkhead_isolation ON agents",
        "policy bulkhead_isolation is missing",
        false,
    )
    .await;
}

#[tokio::test]
async fn widening_permissive_policy_is_found_and_dropped() {
    break_and_repair(
        "CREATE POLICY everyone ON members USING (true)",
        "read other organizations' rows in public.members",
        false,
    )
    .await;
}

#[tokio::test]
async fn altered_policy_is_found_and_restored() {
    break_and_repair(
        "ALTER POLICY bulkhead_isolation ON api_keys USING (org_id = (SELECT auth.org_id()) OR true)",
        "read other organizations' rows in public.api_keys",
        false,
    )
    .await;
}

#[tokio::test]
async fn unprotected_embeddings_leak_through_similarity_search_until_repaired() {
    break_and_repair(
        "ALTER TABLE embeddings DISABLE ROW LEVEL SECURITY",
        "similarity search over public.embeddings",
        false,
    )
    .await;
}

#[tokio::test]
async fn new_unprotected_table_is_found_and_governed() {
    break_and_repair(
        "CREATE TABLE notes (id bigserial PRIMARY KEY, org_id text NOT NULL, body text);
         CREATE INDEX ON notes (org_id);
         GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {G};
         INSERT INTO notes (org_id, body) VALUES ('bulkhead-sentinel', 'secret')",
        "public.notes",
        false,
    )
    .await;
}

#[tokio::test]
async fn replaced_identity_function_is_found_and_restored() {
    break_and_repair(
        "CREATE OR REPLACE FUNCTION auth.org_id() RETURNS text LANGUAGE sql STABLE
         SET search_path = pg_catalog, pg_temp AS $$ SELECT current_setting('app.org', true) $$",
        "identity function's body differs",
        false,
    )
    .await;
}

/// What a session resolves as its organization, and whose messages it sees.
async fn visible(c: &Client) -> (Option<String>, Vec<String>) {
    let id: Option<String> = c
        .query_one("SELECT auth.org_id()", &[])
        .await
        .unwrap()
        .get(0);
    let orgs: Vec<String> = c
        .query("SELECT DISTINCT org_id FROM public.messages", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (id, orgs)
}

#[tokio::test]
async fn a_tenant_search_path_cannot_change_the_identity() {
    let p = pair(json!({})).await;
    let (a, b) = (p.a.org_id.as_str(), p.b.org_id.as_str());
    let c = p.tenant_client().await;
    let role: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        c.batch_execute("CREATE SCHEMA own").await.is_err(),
        "tenants cannot create schemas"
    );
    // A schema tenants can create in (as `public` was before PostgreSQL 15), and pg_temp, which
    // every role can use: an `=` that always holds, and look-alike mapping tables naming b.
    let admin = p.db.admin().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA evil; GRANT USAGE, CREATE ON SCHEMA evil TO \"{}\"",
            role.replace('"', "\"\"")
        ))
        .await
        .unwrap();
    c.batch_execute(
        "CREATE FUNCTION evil.yes(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.yes);
         CREATE TABLE evil.tenant_roles (role_name text, org_id text);
         CREATE TEMP TABLE tenant_roles (role_name text, org_id text);
         SET search_path = pg_temp, evil, pg_catalog",
    )
    .await
    .unwrap();
    for t in ["evil.tenant_roles", "pg_temp.tenant_roles"] {
        c.execute(
            &format!("INSERT INTO {t} VALUES (pg_catalog.current_user(), $1)"),
            &[&b],
        )
        .await
        .unwrap();
    }
    assert_eq!(visible(&c).await, (Some(a.to_owned()), vec![a.to_owned()]));
    assert_holds(
        &p.verify_a().await,
        "with a tenant's objects on its search_path",
    );

    // The same bodies unqualified and without SET search_path read the tenant's temp table
    // (the function for the identity, its set-returning twin, inlined, for the policies).
    admin
        .batch_execute(
            "CREATE OR REPLACE FUNCTION auth.org_id() RETURNS text LANGUAGE plpgsql STABLE PARALLEL SAFE AS
             $$ BEGIN RETURN (SELECT m.org_id FROM tenant_roles m WHERE m.role_name = current_user::text); END $$;
             SET check_function_bodies = off;
             CREATE OR REPLACE FUNCTION auth.org_id_rows() RETURNS SETOF text LANGUAGE sql STABLE PARALLEL SAFE AS
             $$ SELECT m.org_id FROM tenant_roles m WHERE m.role_name = current_user::text $$",
        )
        .await
        .unwrap();
    assert_eq!(visible(&c).await, (Some(b.to_owned()), vec![b.to_owned()]));
    assert_breaks(&p.verify_a().await, "search_path could change");
    assert!(!p.layer.prepare().await.unwrap().is_empty());
    assert_eq!(visible(&c).await, (Some(a.to_owned()), vec![a.to_owned()]));
    assert_holds(&p.verify_a().await, "after the function was restored");
    drop(c);
    admin
        .batch_execute("DROP SCHEMA evil CASCADE")
        .await
        .unwrap();
    drop(admin);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn writable_role_mapping_is_found_and_revoked() {
    break_and_repair(
        "GRANT INSERT, UPDATE ON bulkhead.tenant_roles TO {G}",
        "tenants can write the role mapping",
        false,
    )
    .await;
}

#[tokio::test]
async fn truncate_privilege_is_found_and_revoked() {
    break_and_repair("GRANT TRUNCATE ON projects TO {G}", "TRUNCATE", false).await;
}

#[tokio::test]
async fn bypassrls_is_found_and_repaired() {
    break_and_repair("ALTER ROLE \"{A}\" BYPASSRLS", "BYPASSRLS", true).await;
}

#[tokio::test]
async fn membership_in_another_org_role_is_found_and_revoked() {
    break_and_repair(
        "GRANT \"{B}\" TO \"{A}\"",
        "member of another organization's role",
        true,
    )
    .await;
}

#[tokio::test]
async fn tenant_owned_table_is_found_and_probed() {
    let p = pair(json!({})).await;
    let admin = p.db.admin().await;
    let a = p.layer.role_of(&p.a.org_id);
    admin
        .batch_execute(&format!("ALTER TABLE audit_logs OWNER TO \"{a}\""))
        .await
        .unwrap();
    let v = p.verify_a().await;
    assert_breaks(&v, "owned by tenant role");
    assert_breaks(
        &v,
        "disable row-level security on public.audit_logs: allowed",
    );
    // Ownership is not changed by the operator; the owner fixes it, then all is well.
    admin
        .batch_execute("ALTER TABLE audit_logs OWNER TO CURRENT_USER")
        .await
        .unwrap();
    assert_holds(&p.verify_a().await, "after the owner was restored");
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn security_definer_function_is_found() {
    let p = pair(json!({})).await;
    let admin = p.db.admin().await;
    admin
        .batch_execute(
            "CREATE FUNCTION public.all_messages() RETURNS SETOF messages LANGUAGE sql SECURITY DEFINER
             AS $$ SELECT * FROM messages $$",
        )
        .await
        .unwrap();
    // It really leaks: the tenant reads the sentinel's canary through it.
    let c = p.tenant_client().await;
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM public.all_messages() WHERE org_id <> auth.org_id()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n > 0);
    assert_breaks(
        &p.verify_a().await,
        "SECURITY DEFINER function executable by tenants",
    );
    admin
        .batch_execute("DROP FUNCTION public.all_messages()")
        .await
        .unwrap();
    assert_holds(&p.verify_a().await, "after the function was dropped");
    drop(c);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn the_group_role_sees_nothing() {
    let p = pair(json!({})).await;
    let c = p.tenant_client().await;
    c.batch_execute(&format!("SET ROLE \"{}\"", p.db.group))
        .await
        .expect("members may become the group in PG15");
    for t in TABLES {
        let filter = if t == "skills" {
            " WHERE scope <> 'system'"
        } else {
            ""
        };
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {t}{filter}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{t}");
    }
    // Mapping the group to an organization behind the operator's back is found and undone.
    let admin = p.db.admin().await;
    admin
        .execute("INSERT INTO bulkhead.tenant_roles (role_name, org_id) VALUES ($1, 'bulkhead-sentinel')", &[&p.db.group])
        .await
        .unwrap();
    assert_breaks(&p.verify_a().await, "read rows as the group role");
    assert!(!p.layer.prepare().await.unwrap().is_empty());
    assert_holds(&p.verify_a().await, "after the mapping was removed");
    drop(c);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn odd_display_names_are_stored_verbatim() {
    let db = TestDb::create("d", SEED).await;
    let layer = db.layer(json!({})).await;
    layer.prepare().await.unwrap();
    let names = [
        "O'Brien & Sons",
        "\"; DROP TABLE messages; --",
        "'); DELETE FROM organizations; --",
        "Ünïcødé 株式会社 🚀",
        "SELECT",
        "$$ $bulkhead$ \\ backslash",
        "semi;colon",
    ];
    let admin = db.admin().await;
    for (i, name) in names.iter().enumerate() {
        let org = db.org(&format!("odd{i}"));
        let t = tenant(&org, name, &[], DeletionPolicy::Delete);
        let mut c = Credentials::default();
        layer.ensure(&t, &mut c).await.expect("ensure");
        let stored: String = admin
            .query_one(
                "SELECT display_name FROM organizations WHERE id = $1",
                &[&org.as_str()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(&stored, name);
    }
    let n: i64 = admin
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 0, "messages survived");
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn credentials_work_are_kept_and_rotate() {
    let mut p2 = pair(json!({})).await;
    let first = p2.ca.clone();
    assert_eq!(
        first.get(KEY_USER),
        Some(p2.layer.role_of(&p2.a.org_id).as_str())
    );
    let url = first.get(KEY_URL).unwrap().to_owned();
    assert!(url.starts_with(&format!("postgres://{}:", p2.layer.role_of(&p2.a.org_id))));
    assert!(url.ends_with(&format!("/{}", p2.db.name)));
    // Kept across passes.
    p2.layer.ensure(&p2.a, &mut p2.ca).await.unwrap();
    assert_eq!(p2.ca.get(KEY_PASSWORD), first.get(KEY_PASSWORD));
    // Rotated on request; the old password stops working.
    p2.a.rotate = true;
    p2.layer.ensure(&p2.a, &mut p2.ca).await.unwrap();
    p2.a.rotate = false;
    assert_ne!(p2.ca.get(KEY_PASSWORD), first.get(KEY_PASSWORD));
    assert!(
        tokio_postgres::connect(&url, NoTls).await.is_err(),
        "old password refused"
    );
    assert_holds(&p2.verify_a().await, "with the rotated password");
    // The plaintext never reached the catalog: a SCRAM verifier is stored.
    let admin = p2.db.admin().await;
    let stored: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&p2.layer.role_of(&p2.a.org_id)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"));
    // A wrong password in the credentials shows as a failed login probe.
    let mut wrong = p2.ca.clone();
    wrong.set(KEY_PASSWORD, "not-the-password");
    assert_breaks(&p2.layer.verify(&p2.a, &wrong).await.unwrap(), "log in as");
    let Pair { db, layer, .. } = p2;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn long_org_ids_get_hashed_role_names() {
    let db = TestDb::create("d", SEED).await;
    let layer = db.layer(json!({})).await;
    layer.prepare().await.unwrap();
    let long = OrgId::parse(&format!(
        "{}{}",
        "l".repeat(60 - db.tag.len()),
        db.tag.replace('_', "-")
    ))
    .unwrap();
    let role = layer.role_of(&long);
    assert!(role.len() <= 63, "{role}");
    let t = tenant(&long, "Long", &[], DeletionPolicy::Delete);
    let mut c = Credentials::default();
    layer.ensure(&t, &mut c).await.unwrap();
    assert_holds(&layer.verify(&t, &c).await.unwrap(), "long id");
    layer.cleanup(&t).await.unwrap();
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn cleanup_retain_revokes_login_and_keeps_rows() {
    let mut p = pair(json!({})).await;
    p.a.deletion_policy = DeletionPolicy::Retain;
    let admin = p.db.admin().await;
    let session = p.tenant_client().await;
    let before: i64 = admin
        .query_one(
            "SELECT count(*) FROM messages WHERE org_id = $1",
            &[&p.a.org_id.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    p.layer.cleanup(&p.a).await.unwrap();
    assert!(
        tokio_postgres::connect(p.ca.get(KEY_URL).unwrap(), NoTls)
            .await
            .is_err(),
        "login revoked"
    );
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "open sessions were ended"
    );
    let after: i64 = admin
        .query_one(
            "SELECT count(*) FROM messages WHERE org_id = $1",
            &[&p.a.org_id.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after);
    assert!(before > 0);
    // The organization comes back: ensure restores its login.
    p.layer.ensure(&p.a, &mut p.ca).await.unwrap();
    assert_holds(&p.verify_a().await, "after coming back");
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn cleanup_delete_removes_only_that_org() {
    let p = pair(json!({})).await;
    let admin = p.db.admin().await;
    admin
        .batch_execute(
            "ALTER TABLE messages ADD CONSTRAINT messages_conv FOREIGN KEY (conversation_id) REFERENCES conversations (id)",
        )
        .await
        .unwrap();
    let a = p.a.org_id.as_str();
    for i in 0..30 {
        let conv: i64 = admin
            .query_one(
                "INSERT INTO conversations (org_id, title) VALUES ($1, $2) RETURNING id",
                &[&a, &format!("c{i}")],
            )
            .await
            .unwrap()
            .get(0);
        admin
            .execute(
                "INSERT INTO messages (org_id, conversation_id, body) VALUES ($1, $2, 'x')",
                &[&a, &conv],
            )
            .await
            .unwrap();
    }
    let count_others = "SELECT (SELECT count(*) FROM messages WHERE org_id <> $1) + (SELECT count(*) FROM conversations WHERE org_id <> $1)";
    let others: i64 = admin.query_one(count_others, &[&a]).await.unwrap().get(0);
    p.layer.cleanup(&p.a).await.expect("cleanup");
    for t in TABLES {
        let n: i64 = admin
            .query_one(
                &format!("SELECT count(*) FROM {t} WHERE org_id = $1"),
                &[&a],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{t}");
    }
    let left: i64 = admin.query_one(count_others, &[&a]).await.unwrap().get(0);
    assert_eq!(left, others, "other organizations' rows untouched");
    let role = p.layer.role_of(&p.a.org_id);
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
    let mapped: i64 = admin
        .query_one(
            "SELECT count(*) FROM bulkhead.tenant_roles WHERE org_id = $1",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mapped, 0);
    let reg: i64 = admin
        .query_one("SELECT count(*) FROM organizations WHERE id = $1", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reg, 0);
    // The peer is unaffected.
    assert_holds(
        &p.layer.verify(&p.b, &p.cb).await.unwrap(),
        "beta after acme was deleted",
    );
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

async fn app_role(db: &TestDb, admin: &Client) -> String {
    let name = format!("bhx{}_app", db.tag);
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{name}\" LOGIN PASSWORD 'app-pass';
             GRANT USAGE ON SCHEMA auth, bulkhead TO \"{name}\";
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"{name}\";"
        ))
        .await
        .unwrap();
    name
}

fn url_as(db: &TestDb, user: &str, password: &str) -> String {
    let rest = db.url.split_once('@').unwrap().1;
    format!("postgres://{user}:{password}@{rest}")
}

#[tokio::test]
async fn setting_mode_lets_a_pooled_role_choose_but_pins_tenant_roles() {
    let p = pair(json!({"identityMode": "setting"})).await;
    assert_holds(&p.verify_a().await, "setting mode");
    let admin = p.db.admin().await;
    let app = app_role(&p.db, &admin).await;
    let mut c = connect(&url_as(&p.db, &app, "app-pass")).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "no identity, no rows");
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "SELECT set_config('bulkhead.org_id', $1, true)",
        &[&p.b.org_id.as_str()],
    )
    .await
    .unwrap();
    let orgs: Vec<String> = tx
        .query("SELECT DISTINCT org_id FROM messages", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(orgs, vec![p.b.org_id.as_str().to_owned()]);
    tx.rollback().await.unwrap();
    drop(c);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn jwt_mode_reads_the_claim() {
    let p = pair(json!({"identityMode": "jwt"})).await;
    assert_holds(&p.verify_a().await, "jwt mode");
    let admin = p.db.admin().await;
    let app = app_role(&p.db, &admin).await;
    let mut c = connect(&url_as(&p.db, &app, "app-pass")).await;
    let tx = c.transaction().await.unwrap();
    let claims = json!({"org_id": p.a.org_id.as_str(), "sub": "u1"}).to_string();
    tx.execute(
        "SELECT set_config('request.jwt.claims', $1, true)",
        &[&claims],
    )
    .await
    .unwrap();
    let orgs: Vec<String> = tx
        .query("SELECT DISTINCT org_id FROM messages", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(orgs, vec![p.a.org_id.as_str().to_owned()]);
    tx.rollback().await.unwrap();
    drop(c);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn missing_index_is_reported_or_created() {
    let db = TestDb::create("d", SEED).await;
    db.admin()
        .await
        .batch_execute("DROP INDEX files_org_id_idx")
        .await
        .unwrap();
    let layer = db.layer(json!({})).await;
    layer.prepare().await.unwrap();
    let mut status = IsolationPlatformStatus::default();
    layer.platform_status(&mut status).await.unwrap();
    let audit = status.database.unwrap();
    assert_eq!(audit.coverage, "10/10", "an index is not isolation");
    assert!(
        audit
            .findings
            .iter()
            .any(|f| f.contains("public.files") && f.contains("no index")),
        "{:?}",
        audit.findings
    );
    let layer = db.layer(json!({"createIndexes": true})).await;
    layer.prepare().await.unwrap();
    let mut status = IsolationPlatformStatus::default();
    layer.platform_status(&mut status).await.unwrap();
    assert!(status.database.unwrap().findings.is_empty());
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn a_table_the_policy_cannot_fit_is_reported_and_blocks_nothing() {
    let db = TestDb::create("d", SEED).await;
    db.admin()
        .await
        .batch_execute("CREATE TABLE legacy (id bigserial PRIMARY KEY, org_id uuid NOT NULL)")
        .await
        .unwrap();
    let layer = db.layer(json!({})).await;
    layer
        .prepare()
        .await
        .expect("prepare governs the other tables");
    let mut status = IsolationPlatformStatus::default();
    layer.platform_status(&mut status).await.unwrap();
    let audit = status.database.unwrap();
    assert_eq!(audit.coverage, "10/11");
    assert!(
        audit
            .findings
            .iter()
            .any(|f| f.contains("public.legacy") && f.contains("cannot be built")),
        "{:?}",
        audit.findings
    );
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn audit_command_exit_semantics() {
    let db = TestDb::create("d", SEED).await;
    let spec = db.spec(json!({}));
    // Before prepare: everything is missing.
    let (out, found) = database::run_audit_cli(&db.url, &spec, false)
        .await
        .unwrap();
    assert!(found);
    assert!(out.contains("RLS coverage: 0/10"), "{out}");
    let layer = db.layer(json!({})).await;
    layer.prepare().await.unwrap();
    let (out, found) = database::run_audit_cli(&db.url, &spec, false)
        .await
        .unwrap();
    assert!(!found, "{out}");
    assert!(out.contains("No findings."));
    db.admin()
        .await
        .batch_execute("ALTER TABLE messages DISABLE ROW LEVEL SECURITY")
        .await
        .unwrap();
    let (out, found) = database::run_audit_cli(&db.url, &spec, false)
        .await
        .unwrap();
    assert!(found);
    assert!(
        out.contains("BREACH")
            && out.contains("public.messages")
            && out.contains("row-level security is disabled"),
        "{out}"
    );
    let (out, found) = database::run_audit_cli(&db.url, &spec, true).await.unwrap();
    assert!(found);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["coverage"], "9/10");
    assert_eq!(v["findings"][0]["severity"], "breach");
    // Bad URL: an error, never the password.
    let err = database::run_audit_cli("postgres://u:sekrit@127.0.0.1:1/x", &spec, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains("sekrit"), "{err}");
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn bad_configuration_changes_nothing() {
    let db = TestDb::create("d", SEED).await;
    let bad = db.spec(json!({"settingName": "x'; DROP TABLE messages; --"}));
    let err = DatabaseLayer::connect(&bad, &db.url).await.unwrap_err();
    assert_eq!(err.reason(), "ConfigurationError");
    let n: i64 = db
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'messages'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    db.finish().await;
}

fn owned_by(mut t: Tenant, uid: &str) -> Tenant {
    t.owner.uid = uid.to_owned();
    t
}

async fn count_rows(admin: &Client, table: &str, org: &OrgId) -> i64 {
    admin
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE org_id = $1"),
            &[&org.as_str()],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn tenant_role_bounds_are_set_and_drift_is_found_and_repaired() {
    let p = pair(json!({})).await;
    let c = p.tenant_client().await;
    let row = c
        .query_one(
            "SELECT current_setting('statement_timeout'), current_setting('idle_in_transaction_session_timeout'),
                    current_setting('lock_timeout'), (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .unwrap();
    let got: (String, String, String, i32) = (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        got,
        ("30s".into(), "1min".into(), "10s".into(), 20),
        "a tenant session starts with the platform's bounds"
    );
    drop(c);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
    break_and_repair(
        "ALTER ROLE \"{A}\" RESET statement_timeout; ALTER ROLE \"{A}\" CONNECTION LIMIT -1",
        "lacks its bounds",
        true,
    )
    .await;
}

#[tokio::test]
async fn permissive_policy_naming_one_tenant_role_is_found_and_dropped() {
    break_and_repair(
        "CREATE POLICY acme_sees_all ON members TO \"{A}\" USING (true)",
        "permissive policy \"acme_sees_all\" widens access",
        false,
    )
    .await;
}

#[tokio::test]
async fn restrictive_policies_for_a_tenant_are_left_alone() {
    let p = pair(json!({})).await;
    let admin = p.db.admin().await;
    let a = p.layer.role_of(&p.a.org_id);
    admin
        .batch_execute(&format!(
            "CREATE POLICY acme_narrow ON members AS RESTRICTIVE TO \"{a}\" USING (org_id IS NOT NULL);
             CREATE POLICY acme_wide ON members TO \"{a}\" USING (true)"
        ))
        .await
        .unwrap();
    let repairs = p.layer.prepare().await.unwrap();
    assert!(
        repairs.iter().any(|r| r.0.contains("acme_wide")),
        "{repairs:?}"
    );
    let left: Vec<String> = admin
        .query(
            "SELECT polname::text FROM pg_policy WHERE polrelid = 'members'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["acme_narrow", "bulkhead_isolation"]);
    assert_holds(&p.verify_a().await, "with a restrictive policy");
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn canaries_are_never_written_through_a_tenant_owned_table() {
    let p = pair(json!({})).await;
    let admin = p.db.admin().await;
    let a = p.layer.role_of(&p.a.org_id);
    admin
        .batch_execute(&format!(
            "CREATE TABLE public.fired (who text);
             GRANT INSERT ON public.fired TO PUBLIC;
             ALTER TABLE audit_logs OWNER TO \"{a}\""
        ))
        .await
        .unwrap();
    // As the owner, the tenant attaches a trigger that would run as whoever inserts.
    let c = p.tenant_client().await;
    c.batch_execute(
        "CREATE FUNCTION public.spy() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO public.fired VALUES (current_user::text); RETURN NEW; END $$;
         CREATE TRIGGER spy BEFORE INSERT ON audit_logs FOR EACH ROW EXECUTE FUNCTION public.spy()",
    )
    .await
    .expect_err("tenants cannot create functions in a governed schema");
    admin
        .batch_execute(
            "CREATE FUNCTION public.spy() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.fired VALUES (current_user::text); RETURN NEW; END $$",
        )
        .await
        .unwrap();
    c.batch_execute(
        "CREATE TRIGGER spy BEFORE INSERT ON audit_logs FOR EACH ROW EXECUTE FUNCTION public.spy()",
    )
    .await
    .expect("the owner may add triggers");
    let newcomer = tenant(
        &p.db.org("newcomer"),
        "Newcomer",
        &[],
        DeletionPolicy::Delete,
    );
    let mut creds = Credentials::default();
    p.layer.ensure(&newcomer, &mut creds).await.unwrap();
    let fired: i64 = admin
        .query_one("SELECT count(*) FROM public.fired", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(fired, 0, "the tenant's trigger ran as the admin");
    assert_eq!(count_rows(&admin, "audit_logs", &newcomer.org_id).await, 0);
    assert!(count_rows(&admin, "messages", &newcomer.org_id).await > 0);
    assert_breaks(&p.verify_a().await, "owned by tenant role");
    drop(c);
    admin
        .batch_execute("ALTER TABLE audit_logs OWNER TO CURRENT_USER")
        .await
        .unwrap();
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn a_claimant_with_another_uid_is_refused_and_removes_nothing() {
    let db = TestDb::create("d", SEED).await;
    let layer = db.layer(json!({})).await;
    layer.prepare().await.unwrap();
    let org = db.org("owned");
    let a = owned_by(
        tenant(&org, "Owner", &[], DeletionPolicy::Delete),
        "uid-owner",
    );
    let mut ca = Credentials::default();
    layer.ensure(&a, &mut ca).await.unwrap();
    let admin = db.admin().await;
    let before = count_rows(&admin, "messages", &org).await;
    assert!(before > 0);

    let squatter = owned_by(
        tenant(&org, "Squatter", &[], DeletionPolicy::Delete),
        "uid-squatter",
    );
    let mut cs = Credentials::default();
    let err = layer.ensure(&squatter, &mut cs).await.unwrap_err();
    assert_eq!(err.class(), bulkhead::layers::ErrorClass::Refused);
    let msg = err.to_string();
    assert!(
        msg.contains(org.as_str()) && msg.contains("uid-owner") && msg.contains("adopt-from"),
        "{msg}"
    );
    assert!(
        cs.get(KEY_PASSWORD).is_none(),
        "no credentials for the squatter"
    );

    // Deleting the claimant (policy Delete) leaves the owner's rows, role and mapping.
    layer.cleanup(&squatter).await.expect("cleanup");
    assert_eq!(count_rows(&admin, "messages", &org).await, before);
    let owner: Option<String> = admin
        .query_one(
            "SELECT owner_uid FROM bulkhead.tenant_roles WHERE org_id = $1",
            &[&org.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner.as_deref(), Some("uid-owner"));
    assert_holds(
        &layer.verify(&a, &ca).await.unwrap(),
        "the owner after the squatter left",
    );
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn retained_data_is_inherited_only_through_adopt_from() {
    let db = TestDb::create("d", SEED).await;
    let layer = db.layer(json!({})).await;
    layer.prepare().await.unwrap();
    let org = db.org("kept");
    let old = owned_by(tenant(&org, "Old", &[], DeletionPolicy::Retain), "uid-old");
    let mut c_old = Credentials::default();
    layer.ensure(&old, &mut c_old).await.unwrap();
    let admin = db.admin().await;
    admin
        .execute(
            "INSERT INTO projects (org_id, name) VALUES ($1, 'the old one''s project')",
            &[&org.as_str()],
        )
        .await
        .unwrap();
    layer.cleanup(&old).await.unwrap();
    let kept = count_rows(&admin, "projects", &org).await;
    assert_eq!(kept, 2, "canary and the project are retained");

    let new = owned_by(tenant(&org, "New", &[], DeletionPolicy::Delete), "uid-new");
    let mut c_new = Credentials::default();
    let err = layer.ensure(&new, &mut c_new).await.unwrap_err();
    assert_eq!(err.class(), bulkhead::layers::ErrorClass::Refused, "{err}");
    assert!(err.to_string().contains("uid-old"), "{err}");
    // A new Organization deleted before adopting removes nothing.
    layer.cleanup(&new).await.unwrap();
    assert_eq!(count_rows(&admin, "projects", &org).await, kept);

    let mut adopting = new.clone();
    adopting.adopt_from = Some("uid-old".into());
    let repairs = layer.ensure(&adopting, &mut c_new).await.unwrap();
    assert!(
        repairs
            .iter()
            .any(|r| r.0 == "re-attached retained data of Organization UID uid-old"),
        "{repairs:?}"
    );
    assert_holds(
        &layer.verify(&adopting, &c_new).await.unwrap(),
        "after adoption",
    );
    let c = connect(c_new.get(KEY_URL).unwrap()).await;
    let seen: i64 = c
        .query_one("SELECT count(*) FROM projects", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, kept, "the adopted rows are the new owner's");
    drop(c);
    // From now on the old UID owns nothing: its late cleanup removes nothing.
    let mut late = old.clone();
    late.deletion_policy = DeletionPolicy::Delete;
    layer.cleanup(&late).await.unwrap();
    assert_eq!(count_rows(&admin, "projects", &org).await, kept);
    // The new owner passes without adopting again.
    let repairs = layer.ensure(&new, &mut c_new).await.unwrap();
    assert!(repairs.is_empty(), "{repairs:?}");
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn state_without_a_recorded_owner_needs_adopt_from_legacy() {
    let p = pair(json!({})).await;
    let admin = p.db.admin().await;
    admin
        .execute(
            "UPDATE bulkhead.tenant_roles SET owner_uid = NULL WHERE org_id = $1",
            &[&p.a.org_id.as_str()],
        )
        .await
        .unwrap();
    let mut ca = p.ca.clone();
    let err = p.layer.ensure(&p.a, &mut ca).await.unwrap_err();
    assert_eq!(err.class(), bulkhead::layers::ErrorClass::Refused);
    assert!(err.to_string().contains("adopt-from: legacy"), "{err}");
    let mut legacy = p.a.clone();
    legacy.adopt_from = Some("legacy".into());
    let repairs = p.layer.ensure(&legacy, &mut ca).await.unwrap();
    assert!(
        repairs
            .iter()
            .any(|r| r.0 == "re-attached retained data of Organization UID legacy"),
        "{repairs:?}"
    );
    assert!(p.layer.ensure(&p.a, &mut ca).await.unwrap().is_empty());
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn retire_removes_the_login_and_the_credentials_and_keeps_rows() {
    let mut p = pair(json!({})).await;
    let admin = p.db.admin().await;
    let url = p.ca.get(KEY_URL).unwrap().to_owned();
    let session = p.tenant_client().await;
    let rows = count_rows(&admin, "messages", &p.a.org_id).await;
    let repairs = p.layer.retire(&p.a, &mut p.ca).await.unwrap();
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert!(repairs[0].0.contains("dropped login role"), "{repairs:?}");
    for key in [KEY_URL, KEY_USER, KEY_PASSWORD] {
        assert!(p.ca.get(key).is_none(), "{key} left in the credentials");
    }
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "session ended"
    );
    assert!(
        tokio_postgres::connect(&url, NoTls).await.is_err(),
        "login gone"
    );
    assert_eq!(count_rows(&admin, "messages", &p.a.org_id).await, rows);
    let role = p.layer.role_of(&p.a.org_id);
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
    // Idempotent; and someone else's retire removes nothing.
    assert!(p.layer.retire(&p.a, &mut p.ca).await.unwrap().is_empty());
    let mut cb = p.cb.clone();
    let other = owned_by(p.b.clone(), "uid-someone-else");
    assert!(p.layer.retire(&other, &mut cb).await.unwrap().is_empty());
    assert_holds(
        &p.layer.verify(&p.b, &p.cb).await.unwrap(),
        "beta untouched",
    );
    // Switched back on, the organization gets a new login over its kept rows.
    p.layer.ensure(&p.a, &mut p.ca).await.unwrap();
    assert_holds(&p.verify_a().await, "after switching the layer back on");
    drop(session);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}

#[tokio::test]
async fn a_failed_assertion_leaks_no_database_or_role() {
    let names = tokio::spawn(async {
        let db = TestDb::create("d", SEED).await;
        let role = format!("{}leak", db.role_prefix);
        db.admin()
            .await
            .batch_execute(&format!("CREATE ROLE \"{role}\""))
            .await
            .expect("role");
        let names = (db.name.clone(), role);
        std::panic::panic_any(names);
    })
    .await
    .expect_err("the test body panicked")
    .into_panic();
    let (name, role) = *names.downcast::<(String, String)>().expect("names");
    let admin = connect(common::Testbed::get().pg_admin_url()).await;
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = $1) + (SELECT count(*) FROM pg_roles WHERE rolname = $2)",
            &[&name, &role],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "database {name} or role {role} outlived the panic");
}

/// The policy's identity lookup is inlined: a tenant's query plan scans the role mapping in an
/// InitPlan and calls no function (no `Function Scan`, no `org_id_rows()` in the plan).
#[tokio::test]
async fn the_policy_lookup_is_inlined_into_the_tenant_query() {
    let p = pair(json!({})).await;
    let c = p.tenant_client().await;
    let lines: Vec<String> = c
        .query(
            "EXPLAIN (VERBOSE, COSTS OFF) SELECT * FROM public.conversations WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = lines.join("\n");
    assert!(plan.contains("InitPlan"), "{plan}");
    assert!(
        plan.contains("tenant_roles"),
        "the mapping lookup is in the plan: {plan}"
    );
    assert!(!plan.contains("Function Scan"), "{plan}");
    assert!(!plan.contains("org_id_rows"), "{plan}");
    drop(c);
    let Pair { db, layer, .. } = p;
    drop(layer);
    db.finish().await;
}
