"""Fake torch_musa.utils: only ``musa_extension`` matters to flash_kda."""
