"""Helpers shared by the test suites and the benchmarks: plain functions and classes, no
fixtures (those live in the conftest files, which import from here).

- `portals`: drive the app the way Bitrix24 does (install, frames, events, tokens);
- `results`: open the task-card screen, call its endpoints, read what reached the portal;
- `faults`: a live web server and a TCP proxy for the fault-injection tests;
- `security`: the canary listener, the record of outbound connects, a snapshot of the rows;
- `db`: the test database's URL for processes a test starts;
- `factories`: factory_boy factories for the app's rows.
"""
