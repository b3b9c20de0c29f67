-- The AI agent a workstation's worker advertises at registration (issue 11):
-- `openai` or `command`, and the model when known. NULL: no agent, so `prompt`
-- and `investigate` tasks are refused for the workstation at creation.
ALTER TABLE workstations ADD COLUMN agent_adapter text, ADD COLUMN agent_model text;
