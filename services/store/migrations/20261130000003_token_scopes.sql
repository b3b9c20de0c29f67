-- Issue 12: API tokens may carry scopes (`mcp:read`, `mcp:operate`) that narrow what
-- their role allows. Empty: the role alone decides (every token made before).
ALTER TABLE api_tokens ADD COLUMN scopes text[] NOT NULL DEFAULT '{}'
    CHECK (scopes <@ ARRAY['mcp:read', 'mcp:operate']::text[]);
