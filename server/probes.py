"""Health service names the Kubernetes probes ask for (deploy/ is checked against these).

Readiness and startup ask ``READINESS_SERVICE`` (""): SERVING once the models
are loaded, NOT_SERVING while loading and while draining. Liveness asks
``LIVENESS_SERVICE``: SERVING for as long as the process answers at all, so a
slow model load or a drain never gets the container restarted. Kept apart from
``optic.server.app`` so checks can import it without the generated KServe protobufs.
"""

READINESS_SERVICE = ""
LIVENESS_SERVICE = "optic.liveness"
