-- The application's tables, as its own migrations would create them. bulkhead then governs
-- every table that carries org_id: RLS enabled and forced, one policy, org_id defaulted.
CREATE TABLE IF NOT EXISTS public.conversations (id bigserial PRIMARY KEY, org_id text NOT NULL, title text);
CREATE TABLE IF NOT EXISTS public.messages (id bigserial PRIMARY KEY, org_id text NOT NULL, conversation_id bigint, body text);
CREATE TABLE IF NOT EXISTS public.agents (id bigserial PRIMARY KEY, org_id text NOT NULL, name text);
CREATE TABLE IF NOT EXISTS public.skills (id bigserial PRIMARY KEY, org_id text NOT NULL, scope text NOT NULL DEFAULT 'org', name text);
CREATE TABLE IF NOT EXISTS public.projects (id bigserial PRIMARY KEY, org_id text NOT NULL, name text);
CREATE TABLE IF NOT EXISTS public.members (id bigserial PRIMARY KEY, org_id text NOT NULL, email text);
CREATE TABLE IF NOT EXISTS public.audit_logs (id bigserial PRIMARY KEY, org_id text NOT NULL, action text, at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS public.files (id bigserial PRIMARY KEY, org_id text NOT NULL, s3_key text);
CREATE TABLE IF NOT EXISTS public.api_keys (id bigserial PRIMARY KEY, org_id text NOT NULL, key_hash text);
CREATE TABLE IF NOT EXISTS public.embeddings (id bigserial PRIMARY KEY, org_id text NOT NULL, content text, embedding float8[]);
CREATE INDEX IF NOT EXISTS conversations_org_id ON public.conversations (org_id);
CREATE INDEX IF NOT EXISTS messages_org_id ON public.messages (org_id);
CREATE INDEX IF NOT EXISTS agents_org_id ON public.agents (org_id);
CREATE INDEX IF NOT EXISTS skills_org_id ON public.skills (org_id);
CREATE INDEX IF NOT EXISTS projects_org_id ON public.projects (org_id);
CREATE INDEX IF NOT EXISTS members_org_id ON public.members (org_id);
CREATE INDEX IF NOT EXISTS audit_logs_org_id ON public.audit_logs (org_id);
CREATE INDEX IF NOT EXISTS files_org_id ON public.files (org_id);
CREATE INDEX IF NOT EXISTS api_keys_org_id ON public.api_keys (org_id);
CREATE INDEX IF NOT EXISTS embeddings_org_id ON public.embeddings (org_id);
INSERT INTO public.skills (org_id, scope, name)
SELECT 'bulkhead-sentinel', 'system', 'summarize' WHERE NOT EXISTS (SELECT 1 FROM public.skills WHERE scope = 'system');
