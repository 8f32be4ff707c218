"""Integrations of loramix_fast's ops into serving engines (``loramix_fast.integrations.vllm``)."""
