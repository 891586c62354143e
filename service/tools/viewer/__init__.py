"""``pacs-xai viewer``: Orthanc with DICOMweb, the node and OHIF behind nginx, on 127.0.0.1."""
